"""Orbax stores: path points survive an interrupted save, corrupt models give one-line errors."""

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
    shutil.copytree(tmp_path / "path" / "10", tmp_path / "path" / "20.orbax-checkpoint-tmp-1234")
    reopened = checkpoint.PathStore(tmp_path / "path")
    assert reopened.steps() == [10]
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
    with pytest.raises(CheckpointMismatch, match="cannot be read"):
        checkpoint.PathStore(tmp_path / "path").arrays(10)


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
