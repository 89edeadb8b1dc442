"""Orbax stores: path points survive an interrupted save, corrupt models give one-line errors."""

import json
import shutil

import jax
import numpy as np
import pytest

from spp_jax import checkpoint
from spp_jax.errors import CheckpointMismatch
from tests.helpers import mu_adapter, random_keep, random_params


def _arrays(v: float):
    return {
        "gamma": {"qk": np.full((2, 3), v, np.float32)},
        "t_in": {"qk": np.full((2, 3), np.inf, np.float32)},
    }


def test_path_points_round_trip_and_reopen(tmp_path):
    store = checkpoint.PathStore(tmp_path / "path")
    store.save(10, _arrays(1.0), {"step": 10, "support": {"all": 0.5}})
    store.save(20, _arrays(2.0), {"step": 20})
    store.wait()
    reopened = checkpoint.PathStore(tmp_path / "path")
    assert reopened.steps() == [10, 20]
    assert reopened.record(10)["support"]["all"] == 0.5
    np.testing.assert_array_equal(reopened.arrays(20)["gamma"]["qk"], _arrays(2.0)["gamma"]["qk"])


def test_interrupted_save_leaves_earlier_points_intact(tmp_path):
    store = checkpoint.PathStore(tmp_path / "path")
    store.save(10, _arrays(1.0), {"step": 10})
    store.wait()
    # A kill during a save leaves orbax's temporary directory behind (copy a finished point's files into one).
    for tmp in ("20.orbax-checkpoint-tmp", "30.orbax-checkpoint-tmp-1234"):
        shutil.copytree(tmp_path / "path" / "10", tmp_path / "path" / tmp)
    reopened = checkpoint.PathStore(tmp_path / "path")
    assert reopened.steps() == [10]
    assert sorted(p.name for p in (tmp_path / "path").iterdir()) == ["10"]  # cleaned on open
    np.testing.assert_array_equal(reopened.arrays(10)["gamma"]["qk"], _arrays(1.0)["gamma"]["qk"])


def test_missing_and_corrupt_points_give_one_line_errors(tmp_path):
    store = checkpoint.PathStore(tmp_path / "path")
    store.save(10, _arrays(1.0), {"step": 10})
    store.wait()
    with pytest.raises(CheckpointMismatch, match="no path point at step 11") as e:
        store.arrays(11)
    assert "\n" not in str(e.value)
    for f in (tmp_path / "path" / "10" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointMismatch, match=r"path point 10 .* is corrupt"):
        checkpoint.PathStore(tmp_path / "path").arrays(10)


def _flip_array_bytes(root, rng) -> int:
    """Overwrite the payload of every array chunk with other bytes of the same length (still parses)."""
    n = 0
    for f in sorted(root.rglob("*")):
        if f.is_file() and "/d/" in f.as_posix():  # tensorstore/ocdbt data files
            b = bytearray(f.read_bytes())
            b[int(rng.integers(len(b) // 2, len(b)))] ^= 0xFF
            f.write_bytes(bytes(b))
            n += 1
    return n


def test_garbage_that_parses_is_caught_by_the_checksum(tmp_path):
    store = checkpoint.PathStore(tmp_path / "path")
    store.save(10, _arrays(1.0), {"step": 10})
    store.wait()
    rec = tmp_path / "path" / "10" / "record" / "metadata"
    assert json.loads(rec.read_text())["checksum"]
    good = rec.read_text()
    rec.write_text(json.dumps({"step": 10, "checksum": "0" * 64}))  # valid JSON, wrong data
    with pytest.raises(CheckpointMismatch, match="does not match its checksum"):
        checkpoint.PathStore(tmp_path / "path").arrays(10)
    rec.write_text('{"step": "garbage"}')
    with pytest.raises(CheckpointMismatch, match="record does not describe this step"):
        checkpoint.PathStore(tmp_path / "path").record(10)
    rec.write_text(good)
    np.testing.assert_array_equal(checkpoint.PathStore(tmp_path / "path").arrays(10)["gamma"]["qk"], 1.0)
    assert _flip_array_bytes(tmp_path / "path" / "10" / "state", np.random.default_rng(0)) > 0
    with pytest.raises(CheckpointMismatch, match=r"path point 10 .* is corrupt") as e:
        checkpoint.PathStore(tmp_path / "path").arrays(10)
    assert "\n" not in str(e.value)


def test_truncation_after_a_step_and_read_only_stores(tmp_path):
    assert checkpoint.PathStore(tmp_path / "absent", read_only=True).steps() == []
    assert not (tmp_path / "absent").exists()  # reading never creates directories
    store = checkpoint.PathStore(tmp_path / "path")
    for k in (4, 8, 12):
        store.save(k, _arrays(float(k)), {"step": k})
    store.wait()
    assert store.delete_after(5) == [8, 12]
    assert checkpoint.PathStore(tmp_path / "path").steps() == [4]
    store.save(8, _arrays(8.0), {"step": 8})  # the replayed step saves again without StepAlreadyExists
    store.wait()
    assert store.steps() == [4, 8]


def test_resume_store_falls_back_past_a_corrupt_latest_state(tmp_path):
    store = checkpoint.ResumeStore(tmp_path / "resume")
    store.save(5, {"x": np.full(3, 5.0, np.float32)}, {"data": "a"})
    store.wait()
    store.save(10, {"x": np.full(3, 10.0, np.float32)}, {"data": "b"})
    store.wait()
    abstract = {"x": jax.ShapeDtypeStruct((3,), np.float32)}
    assert store.restore_latest(abstract)[0] == 10
    for f in (tmp_path / "resume" / "10" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    step, state, extras = checkpoint.ResumeStore(tmp_path / "resume").restore_latest(abstract)
    assert step == 5 and extras["data"] == "a"
    np.testing.assert_array_equal(state["x"], 5.0)


def _saved_model(tmp_path):
    a = mu_adapter()
    small, spec = a.extract(random_params(a), random_keep(a.mask_spec(), np.random.default_rng(0)))
    checkpoint.save_model(tmp_path / "m", small, spec, target="params:0.5")
    return small, spec


def test_saved_model_loads_identically(tmp_path):
    small, spec = _saved_model(tmp_path)
    module, params, arch = checkpoint.load_pruned(tmp_path / "m")
    assert arch == spec
    jax.tree.map(np.testing.assert_array_equal, small, params)


def test_corrupt_or_incomplete_model_dirs_are_refused(tmp_path):
    _saved_model(tmp_path)
    (tmp_path / "m" / "arch_spec.json").unlink()  # a save killed before its last file
    with pytest.raises(CheckpointMismatch, match=r"no arch_spec\.json"):
        checkpoint.load_pruned(tmp_path / "m")
    _saved_model(tmp_path)
    shutil.rmtree(tmp_path / "m" / "params")
    with pytest.raises(CheckpointMismatch, match="cannot be read"):
        checkpoint.load_pruned(tmp_path / "m")
