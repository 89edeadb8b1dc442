"""Input pipeline: offline Fashion-MNIST builder, tfds sources, grain loaders (CPU, fast)."""

import gzip
import json
import threading
from pathlib import Path

import grain
import numpy as np
import pytest

from spp_jax.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SppFashionMnist,
    build,
    get_source,
    iterate_eval,
    loader_state,
    make_loader,
    num_classes,
    read_idx,
    restore_loader_state,
    write_idx,
)
from spp_jax.data import fashion_mnist as fm
from spp_jax.errors import AssetNotInstalled, CheckpointMismatch, ConfigError

N_TRAIN, N_TEST = 64, 32
REAL_DIR = Path(fm.DEFAULT_SOURCE_DIR)


def _write_fake_idx(directory: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        prefix = fm.SPLIT_FILES[split]
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data[split] = (images, labels)
    return data


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """(raw arrays, idx dir, data_dir with the synthetic dataset already built)."""
    src = tmp_path_factory.mktemp("idx")
    data = _write_fake_idx(src)
    data_dir = tmp_path_factory.mktemp("tfds")
    build(data_dir, source_dir=src)
    return data, src, data_dir


def _list_source(n: int, value=None, size: int = 8) -> list[dict]:
    """In-memory random-access source; label == index so tests can track examples."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 1), dtype=np.uint8) if value is None else None
        if value is not None:
            img = np.full((size, size, 1), value, np.uint8)
        out.append({"image": img, "label": i})
    return out


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(
        np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
        for x, y in zip(a, b, strict=True)
    )


# ----------------------------------------------------------------------------- builder


def test_idx_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "x.gz", arr)
    out = read_idx(tmp_path / "x.gz")
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


def test_builder_round_trip(fake):
    data, src, data_dir = fake
    builder = SppFashionMnist(data_dir=data_dir, source_dir=src)
    assert builder.info.features["label"].num_classes == 10
    for split, (images, labels) in data.items():
        source = builder.as_data_source(split=split)
        assert len(source) == len(images)
        for i in range(len(images)):
            ex = source[i]
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (28, 28, 1)
            assert np.array_equal(ex["image"][:, :, 0], images[i])
            assert int(ex["label"]) == labels[i]


def test_get_source_local_env_and_slicing(fake, monkeypatch):
    data, src, data_dir = fake
    monkeypatch.setenv(fm.SOURCE_DIR_ENV, str(src))
    sliced = get_source("fashion_mnist", "train[:10]", data_dir)
    assert len(sliced) == 10
    assert np.array_equal(sliced[3]["image"][:, :, 0], data["train"][0][3])
    assert len(get_source("spp_fashion_mnist", "test", data_dir)) == N_TEST
    assert num_classes("fashion_mnist") == 10


def test_build_is_idempotent_and_concurrent_safe(tmp_path, monkeypatch):
    src = tmp_path / "idx"
    src.mkdir()
    _write_fake_idx(src)
    calls = []
    original = SppFashionMnist.download_and_prepare

    def counting(self, **kwargs):
        calls.append(1)
        return original(self, **kwargs)

    monkeypatch.setattr(SppFashionMnist, "download_and_prepare", counting)
    errors = []

    def worker():
        try:
            build(tmp_path / "tfds", source_dir=src)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    info = tmp_path / "tfds" / "spp_fashion_mnist" / "1.0.0" / "dataset_info.json"
    mtime = info.stat().st_mtime_ns
    build(tmp_path / "tfds", source_dir=src)
    assert len(calls) == 1 and info.stat().st_mtime_ns == mtime


def test_missing_files_raise_asset_not_installed(tmp_path):
    with pytest.raises(AssetNotInstalled, match="apt-get install -y dataset-fashion-mnist") as e:
        build(tmp_path / "tfds", source_dir=tmp_path / "nowhere")
    assert "\n" not in str(e.value) and "nowhere" in str(e.value)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"not gzip at all", "Not a gzipped file"),
        (gzip.compress(b"\x00\x00\x07\x01" + b"\x00" * 8), "bad magic"),
        (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05" + b"\x01\x02"), "payload"),
        (gzip.compress(b"\x00\x00\x08\x03\x00\x00"), "truncated header"),
    ],
)
def test_corrupt_idx_gives_one_line_error(tmp_path, payload, reason):
    path = tmp_path / "bad.gz"
    path.write_bytes(payload)
    with pytest.raises(AssetNotInstalled, match=reason) as e:
        read_idx(path)
    assert "\n" not in str(e.value) and "corrupt IDX file" in str(e.value)


def test_corrupt_file_fails_build_before_writing(tmp_path):
    src = tmp_path / "idx"
    src.mkdir()
    _write_fake_idx(src)
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(AssetNotInstalled, match="corrupt IDX file"):
        build(tmp_path / "tfds", source_dir=src)
    assert not (tmp_path / "tfds" / "spp_fashion_mnist" / "1.0.0").exists()


def test_catalog_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'no_such_dataset'"):
        get_source("no_such_dataset", "train", str(tmp_path))
    with pytest.raises(AssetNotInstalled, match="'mnist' is not prepared") as e:
        get_source("mnist", "train[:10]", str(tmp_path))
    assert "\n" not in str(e.value)
    assert num_classes("mnist", str(tmp_path)) == 10


def test_bad_split_is_config_error(fake):
    _, _, data_dir = fake
    with pytest.raises(ConfigError, match="bad split 'validation'"):
        get_source("fashion_mnist", "validation", data_dir)


# ----------------------------------------------------------------------------- loader


def _loader(source, **kw):
    # A small read-ahead keeps the many short-lived test loaders cheap on a 2-core CPU.
    args = dict(
        global_batch_size=8,
        image_size=16,
        train=True,
        seed=0,
        num_epochs=None,
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=16),
    )
    return make_loader(source, **{**args, **kw})


def test_loader_shapes_and_dtypes(fake):
    _, _, data_dir = fake
    source = get_source("fashion_mnist", "train", data_dir)
    for augment in (False, True):
        batch = next(_loader(source, image_size=24, augment=augment, read_options=None))
        assert set(batch) == {"image", "label"}
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 24, 24, 3)
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
        assert np.isfinite(batch["image"]).all()


def test_normalisation_of_constant_image():
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    batch = next(_loader(_list_source(16, value=200), image_size=12, train=False))
    expected = (200 / 255 - mean) / std
    np.testing.assert_allclose(batch["image"], np.broadcast_to(expected, (8, 12, 12, 3)), atol=1e-5)


def test_gray_to_rgb_and_identity_resize():
    source = _list_source(16, size=28)
    batch = next(_loader(source, image_size=28, train=False, mean=(0, 0, 0), std=(1, 1, 1)))
    image = batch["image"]
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
    pixels = np.stack([source[int(i)]["image"][:, :, 0] for i in batch["label"]])
    np.testing.assert_allclose(image[..., 0] * 255, pixels, atol=1e-3)


def test_same_seed_same_batches_other_seed_differs():
    source = _list_source(64)
    for augment in (False, True):
        a = _take(_loader(source, seed=3, augment=augment), 12)
        b = _take(_loader(source, seed=3, augment=augment), 12)
        c = _take(_loader(source, seed=4, augment=augment), 12)
        assert _same(a, b) and not _same(a, c)


def test_augment_changes_pixels_not_labels():
    source = _list_source(64)
    plain = _take(_loader(source, seed=5), 4)
    aug = _take(_loader(source, seed=5, augment=True), 4)
    assert all(np.array_equal(p["label"], q["label"]) for p, q in zip(plain, aug, strict=True))
    assert not _same(plain, aug)


def test_epochs_cover_data_and_reshuffle():
    source = _list_source(64)
    batches = _take(_loader(source, num_epochs=2), 16)
    first = np.concatenate([b["label"] for b in batches[:8]])
    second = np.concatenate([b["label"] for b in batches[8:]])
    assert sorted(first) == list(range(64)) == sorted(second)
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(64))
    assert len(list(_loader(source, num_epochs=1, global_batch_size=16))) == 4
    sizes = [
        len(b["label"]) for b in _loader(source, num_epochs=1, global_batch_size=24, drop_remainder=False)
    ]
    assert sizes == [24, 24, 16]


def test_resume_from_saved_state_gives_same_batches():
    source = _list_source(64)
    kw = dict(seed=11, augment=True, global_batch_size=16)  # 4 batches/epoch: resume crosses one
    it = _loader(source, **kw)
    _take(it, 3)
    saved = json.dumps(loader_state(it))  # what a checkpoint would store
    expected = _take(it, 5)
    fresh = _loader(source, **kw)
    restore_loader_state(fresh, saved)
    assert _same(_take(fresh, 5), expected)
    other = _loader(source, **kw)
    restore_loader_state(other, json.loads(saved))  # dict form works too
    assert _same(_take(other, 5), expected)


def test_restore_bad_state_is_checkpoint_mismatch():
    it = _loader(_list_source(64))
    with pytest.raises(CheckpointMismatch):
        restore_loader_state(it, {"something": 1})
    with pytest.raises(CheckpointMismatch):
        restore_loader_state(it, "not json")


def test_process_shards_are_disjoint_and_cover_an_epoch():
    source = _list_source(64)
    seen = []
    for index in range(2):
        it = _loader(source, num_epochs=1, global_batch_size=16, process_index=index, process_count=2)
        batches = list(it)
        assert len(batches) == 4 and all(b["label"].shape == (8,) for b in batches)
        seen.append(set(np.concatenate([b["label"] for b in batches]).tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(64))
    with pytest.raises(ConfigError, match="multiple of process_count"):
        _loader(source, global_batch_size=9, process_index=0, process_count=2)


def test_bad_loader_config():
    with pytest.raises(ConfigError, match="no batch"):
        _loader(_list_source(4), global_batch_size=8, num_epochs=1)
    with pytest.raises(ConfigError, match="seed"):
        _loader(_list_source(16), seed=-1)


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("count", [1, 2])
def test_eval_covers_every_example_once(count):
    source = _list_source(33)
    labels, nbatches = [], set()
    for index in range(count):
        batches = list(
            iterate_eval(source, batch_size=5, image_size=8, process_index=index, process_count=count)
        )
        nbatches.add(len(batches))
        for b in batches:
            assert b["image"].shape == (5, 8, 8, 3) and b["mask"].dtype == np.float32
            labels.extend(b["label"][b["mask"] == 1].tolist())
    assert len(nbatches) == 1  # every process runs the same number of steps
    assert sorted(labels) == list(range(33))


def test_eval_on_built_split(fake):
    _, _, data_dir = fake
    source = get_source("fashion_mnist", "test", data_dir)
    batches = list(iterate_eval(source, batch_size=10, image_size=8, process_count=1))
    assert len(batches) == 4 and sum(b["mask"].sum() for b in batches) == N_TEST
    labels = np.concatenate([b["label"] for b in batches])[:N_TEST]
    assert np.array_equal(labels, np.arange(N_TEST) % 10)


# ----------------------------------------------------------------------------- real asset


@pytest.mark.asset
@pytest.mark.skipif(
    not (REAL_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not in {REAL_DIR}: apt-get install -y dataset-fashion-mnist",
)
def test_real_fashion_mnist(tmp_path):
    builder = build(tmp_path, source_dir=REAL_DIR)
    assert builder.info.features["label"].num_classes == 10
    train = get_source("fashion_mnist", "train", tmp_path)
    test = get_source("fashion_mnist", "test", tmp_path)
    assert (len(train), len(test)) == (60000, 10000)
    assert train[0]["image"].shape == (28, 28, 1) and 0 <= int(test[9999]["label"]) < 10


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume():
    source = _list_source(64)
    kw = dict(seed=2, augment=True, global_batch_size=16)
    expected = _take(_loader(source, **kw), 6)
    it = _loader(source, worker_count=1, **kw)
    try:
        assert _same(_take(it, 3), expected[:3])
        state = json.dumps(loader_state(it))
    finally:
        it.close()
    fresh = _loader(source, worker_count=1, **kw)
    try:
        restore_loader_state(fresh, state)
        assert _same(_take(fresh, 3), expected[3:])
    finally:
        fresh.close()


def test_loader_state_round_trips_through_orbax_json(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    source = _list_source(64)
    it = _loader(source, seed=9)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=ocp.args.JsonSave(loader_state(it))))
        mngr.wait_until_finished()
        restored = mngr.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    fresh = _loader(source, seed=9)
    restore_loader_state(fresh, restored["data"])
    assert _same(_take(fresh, 2), _take(it, 2))
