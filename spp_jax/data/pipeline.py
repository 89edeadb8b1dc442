"""Random-access sources (tfds array_record) and deterministic, resumable grain loaders.

Pipeline (grain ``MapDataset`` API, one process's view)::

    source -> seed -> shuffle -> repeat -> (random_)map (bilinear resize, optional crop/flip; uint8)
    -> this process's rows of every global batch -> to_iter_dataset [-> mp_prefetch] -> batch
    -> normalise (float32, gray->RGB)

The global stream (order and augmentation) depends on the seed alone: process ``i`` of ``n`` reads rows
``[i*b, (i+1)*b)`` of each global batch of ``n*b`` and nothing else, so the global batches are the same
for any process count and a run can resume on another one. Each element is a pure function of (seed,
position), so an iterator's ``get_state()`` (``{"next_index": int}``, elements this process consumed) is
all that is needed to resume exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from spp_jax.data import fashion_mnist
from spp_jax.errors import AssetNotInstalled, CheckpointMismatch, ConfigError

IMAGE_KEY = "image"
LABEL_KEY = "label"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOCAL_NAMES = ("fashion_mnist", "spp_fashion_mnist")
CROP_SCALE = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

Source = Sequence[Mapping[str, Any]]
Batch = dict[str, np.ndarray]


def get_source(name: str, split: str, data_dir: str | os.PathLike[str] | None = None) -> Source:
    """Returns a random-access source (``len``, ``[i]`` -> dict of numpy) for a split.

    Args:
      name: ``"fashion_mnist"``/``"spp_fashion_mnist"`` (built from local IDX files on first
        use) or any tfds catalog name already prepared as array_record in ``data_dir``.
      split: tfds split spec, slicing allowed (``"train[:10000]"``, ``"test[50%:]"``).
      data_dir: tfds data directory (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    """
    if name in LOCAL_NAMES:
        builder = fashion_mnist.build(data_dir)
        return _as_data_source(builder, name, split, lambda: builder.as_data_source(split=split))
    builder = _catalog_builder(name, data_dir)
    if not builder.is_prepared():
        raise AssetNotInstalled(
            f"dataset {name!r} is not prepared in {builder.data_dir_root}; prepare it there with "
            f"tfds (`tfds build {name} --data_dir {builder.data_dir_root} "
            "--file_format array_record`) or pass the right data_dir"
        )
    return _as_data_source(
        builder, name, split, lambda: tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    )


def num_classes(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, label_key: str = LABEL_KEY
) -> int:
    """Number of classes of ``name``'s ClassLabel feature ``label_key`` (no build needed)."""
    if name in LOCAL_NAMES:
        if label_key != LABEL_KEY:
            raise ConfigError(
                f"dataset {name!r} has no label feature {label_key!r}; "
                f"use {LABEL_KEY!r} (its features: {IMAGE_KEY!r}, {LABEL_KEY!r})"
            )
        return len(fashion_mnist.CLASS_NAMES)
    features = _catalog_builder(name, data_dir).info.features
    try:
        feature = features[label_key]
    except KeyError:
        feature = None
    if not isinstance(feature, tfds.features.ClassLabel):
        raise ConfigError(
            f"dataset {name!r} has no ClassLabel feature {label_key!r} "
            f"(features: {sorted(features)}); set the label key to its class label feature"
        )
    return int(feature.num_classes)


def _catalog_builder(name: str, data_dir: str | os.PathLike[str] | None) -> Any:
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(
            f"unknown dataset {name!r} (not in the tfds catalog); check the name "
            f"(local: {', '.join(LOCAL_NAMES)}; catalog e.g. 'mnist', 'imagenet2012')"
        ) from None


def _as_data_source(builder: Any, name: str, split: str, open_fn: Callable[[], Source]) -> Source:
    """Runs ``open_fn`` and turns tfds' multi-line errors into one-line SPP errors."""
    try:
        return open_fn()
    except NotImplementedError:
        raise AssetNotInstalled(
            f"dataset {name!r} in {builder.data_dir} is not array_record; re-prepare it with "
            "`--file_format array_record` for random access"
        ) from None
    except (ValueError, KeyError, AssertionError) as e:
        reason = (str(e).splitlines()[0] if str(e) else type(e).__name__).split(". ")[0].rstrip(".")
        raise ConfigError(
            f"bad split {split!r} for dataset {name!r} ({reason}); use one of its splits "
            f"{sorted(builder.info.splits)}, slicing allowed (e.g. 'train[:5000]', 'test[50%:]')"
        ) from None


# ----------------------------------------------------------------------------- preprocessing


def _to_hwc_uint8(image: Any) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ConfigError(f"image has shape {list(img.shape)}; images must be [h, w] or [h, w, 1|3|4]")
    if img.dtype != np.uint8:
        raise ConfigError(f"image is {img.dtype}, not uint8; decode it to uint8 pixels")
    return img[:, :, :3]


def _resize(img: np.ndarray, size: int, box: tuple[float, ...] | None = None) -> np.ndarray:
    """Bilinear resize of ``box`` (x0, y0, x1, y1; default whole image) to ``size`` x ``size``."""
    h, w, c = img.shape
    if box is None and (h, w) == (size, size):
        return img
    pil = Image.fromarray(img[:, :, 0] if c == 1 else img)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, box=box))
    return out.reshape(size, size, c)


def _crop_box(h: int, w: int, rng: np.random.Generator) -> tuple[float, ...]:
    """Random-resized-crop-lite: area fraction in CROP_SCALE, aspect ratio in CROP_RATIO."""
    area = rng.uniform(*CROP_SCALE) * h * w
    ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    cw = min(float(w), math.sqrt(area * ratio))
    ch = min(float(h), math.sqrt(area / ratio))
    x0 = rng.uniform(0.0, w - cw)
    y0 = rng.uniform(0.0, h - ch)
    return (x0, y0, x0 + cw, y0 + ch)


def _prepare(
    example: Mapping[str, Any],
    rng: np.random.Generator | None,
    *,
    image_size: int,
    image_key: str,
    label_key: str,
) -> dict[str, np.ndarray]:
    """Example -> dict(image=uint8 [s, s, 1|3], label=int32 []); augments iff ``rng`` is given."""
    img = _to_hwc_uint8(example[image_key])
    if rng is None:
        img = _resize(img, image_size)
    else:
        img = _resize(img, image_size, box=_crop_box(img.shape[0], img.shape[1], rng))
        if rng.random() < 0.5:
            img = img[:, ::-1]
    return {"image": np.ascontiguousarray(img), "label": np.int32(example[label_key])}


def _normalize(batch: Batch, *, mean: np.ndarray, std: np.ndarray) -> Batch:
    """uint8 [b, s, s, 1|3] -> float32 [b, s, s, 3] ``(x / 255 - mean) / std``.

    Gray (1 channel) becomes RGB here through a 256 x 3 lookup table (cheaper than per example).
    """
    pixels = batch["image"]
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    offset = (-mean / std).astype(np.float32)
    if pixels.shape[-1] == 1:
        lut = np.arange(256, dtype=np.float32)[:, None] * scale + offset
        image = lut[pixels[..., 0]]
    else:
        image = pixels.astype(np.float32)
        image *= scale
        image += offset
    return {**batch, "image": image}


def _stats(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.shape != (3,) or (what == "std" and np.any(arr <= 0)):
        raise ConfigError(f"{what} must be 3 per-channel values (std > 0), got {values!r}")
    return arr


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"process_index {index} not in [0, process_count={count})")
    return index, count


def _allow_unparsed_absl_flags() -> None:
    """grain 0.2.18's ``mp_prefetch`` reads an absl flag and fails when the program did not
    parse flags (no ``absl.app.run``; google/grain#1355): use the flags' defaults then."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------- loaders


def loader_process(
    global_batch_size: int,
    seed: int,
    num_epochs: int | None,
    process_index: int | None,
    process_count: int | None,
) -> tuple[int, int]:
    """(this process's index, process count) after checking a loader's batch, seed and epoch arguments."""
    index, count = _process(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % count:
        raise ConfigError(
            f"global_batch_size {global_batch_size} must be a positive multiple of process_count {count}"
        )
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    return index, count


class _ProcessRows:
    """Row ``j`` of one process's stream -> the global element it is (a picklable grain map function)."""

    def __init__(self, ds: grain.MapDataset, index: int, count: int, batch_size: int, full: int, tail: int):
        self.ds, self.index, self.count = ds, index, count
        self.b, self.full, self.tail = batch_size, full, tail

    def __call__(self, j: int) -> Any:
        q, t = divmod(int(j), self.b)
        if q < self.full:  # row t of this process's share of global batch q
            return self.ds[(q * self.count + self.index) * self.b + t]
        t = int(j) - self.full * self.b  # the last, partial global batch: an equal share each
        return self.ds[self.full * self.count * self.b + self.index * self.tail + t]


def process_rows(
    ds: grain.MapDataset, index: int, count: int, batch_size: int, drop_remainder: bool = True
) -> grain.MapDataset:
    """This process's rows of every global batch of ``ds``: rows ``[index*b, (index+1)*b)`` of each batch
    of ``count*b`` (``b = batch_size``), so the processes' batches concatenated in process order are the
    global batch one process would read. A last, partial global batch of ``r`` rows (``drop_remainder``
    False) gives each process ``r // count`` of them. Returns ``ds`` itself for one process."""
    if count == 1:
        return ds
    full, rest = divmod(len(ds), count * batch_size)
    tail = 0 if drop_remainder else rest // count
    rows = _ProcessRows(ds, index, count, batch_size, full, tail)
    return grain.MapDataset.range(full * batch_size + tail).map(rows)


def check_batches(
    n: int, num_epochs: int | None, global_batch_size: int, count: int, drop_remainder: bool, what: str
) -> None:
    """Refuse a loader that yields no batch (or, over several processes, not a row for each)."""
    total = n * (num_epochs or 1)
    if n == 0 or (drop_remainder and total < global_batch_size) or total < count:
        over = f" over {count} processes" if count > 1 else ""
        raise ConfigError(
            f"{n} {what}{over} give no batch of {global_batch_size}; use a smaller batch or a bigger split"
        )


def make_loader(
    source: Source,
    *,
    global_batch_size: int,
    image_size: int,
    train: bool,
    seed: int,
    num_epochs: int | None,
    process_index: int | None = None,
    process_count: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool = False,
    drop_remainder: bool = True,
    worker_count: int = 0,
    image_key: str = IMAGE_KEY,
    label_key: str = LABEL_KEY,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Returns a deterministic, checkpointable grain iterator of this process's batches.

    Process ``i`` of ``n`` reads rows ``[i*b, (i+1)*b)`` of every global batch (``b =
    global_batch_size // n``, ``process_rows``): its share of the data, disjoint from the others', and
    the global batches (order, augmentation) are the same for any ``n``.
    ``train`` shuffles (differently each epoch); ``augment`` adds a random-resized-crop-lite
    (area 0.6-1, ratio 3/4-4/3) and a horizontal flip, seeded by ``seed`` and the element index.
    ``num_epochs=None`` repeats forever. Batches: ``image`` float32 [b, s, s, 3] normalised by
    ``mean``/``std`` after scaling to [0, 1]; ``label`` int32 [b]. ``worker_count > 0`` runs
    the per-example work in that many processes (same batches as ``worker_count=0``).
    Save/restore with ``it.get_state()``/``it.set_state()`` (see ``loader_state``).
    """
    index, count = loader_process(global_batch_size, seed, num_epochs, process_index, process_count)
    if image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    batch_size = global_batch_size // count
    check_batches(len(source), num_epochs, global_batch_size, count, drop_remainder, "examples")
    norm = functools.partial(_normalize, mean=_stats(mean, "mean"), std=_stats(std, "std"))
    prepare = functools.partial(_prepare, image_size=image_size, image_key=image_key, label_key=label_key)
    ds = grain.MapDataset.source(source).seed(seed)
    if train:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(prepare) if augment else ds.map(functools.partial(prepare, rng=None))
    ds = process_rows(ds, index, count, batch_size, drop_remainder)
    it_ds = ds.to_iter_dataset(read_options)
    if worker_count > 0:
        _allow_unparsed_absl_flags()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder)
    return iter(it_ds.map(norm))


def iterate_eval(
    source: Source,
    *,
    batch_size: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    image_key: str = IMAGE_KEY,
    label_key: str = LABEL_KEY,
    read_options: grain.ReadOptions | None = None,
) -> Iterator[Batch]:
    """Yields every example of this process's shard once, in order, in padded batches.

    Process ``i`` of ``n`` reads ``source[i::n]``; all processes yield the same number of
    batches of ``batch_size`` (padding at the end). Each batch has ``image`` float32
    [b, s, s, 3], ``label`` int32 [b] and ``mask`` float32 [b] (1 real, 0 padding), so
    ``sum(mask * correct) / sum(mask)`` summed over processes is the exact split accuracy.
    """
    index, count = _process(process_index, process_count)
    total = len(source)
    if batch_size < 1 or total == 0:
        raise ConfigError(f"need batch_size >= 1 and a non-empty split, got {batch_size}, {total}")
    per_process = math.ceil(total / count)
    num_batches = max(1, math.ceil(per_process / batch_size))
    prepare = functools.partial(
        _prepare, rng=None, image_size=image_size, image_key=image_key, label_key=label_key
    )

    def load(j: int) -> dict[str, np.ndarray]:
        k = index + j * count
        if k >= total:  # padding: a real example (same shape), label 0, mask 0
            return {**prepare(source[k % total]), "label": np.int32(0), "mask": np.float32(0)}
        return {**prepare(source[k]), "mask": np.float32(1)}

    ds = grain.MapDataset.range(num_batches * batch_size).map(load)
    norm = functools.partial(_normalize, mean=_stats(mean, "mean"), std=_stats(std, "std"))
    return iter(ds.to_iter_dataset(read_options).batch(batch_size).map(norm))


# ----------------------------------------------------------------------------- state


def loader_state(it: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's grain state as a plain JSON-able dict.

    ``{"next_index": n}`` (examples this process has consumed) when ``worker_count=0``; a dict
    of per-worker states when ``worker_count > 0`` (restore into the same ``worker_count``).
    Store it with orbax as ``ocp.args.JsonSave(loader_state(it))`` (or let grain's own handler
    do it: ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``).
    """
    return json.loads(json.dumps(it.get_state()))


def restore_loader_state(it: grain.DatasetIterator, state: Mapping[str, Any] | str | bytes) -> None:
    """Sets ``it`` (built with the same arguments) to a state from ``loader_state``/JSON."""
    try:
        if isinstance(state, str | bytes):
            state = json.loads(state)
        it.set_state(dict(state))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointMismatch(
            f"loader state {str(state)[:80]!r} does not fit this loader ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); rebuild the loader with the "
            "checkpoint's dataset/batch settings"
        ) from None
