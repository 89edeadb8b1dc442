"""FSDP (`mesh.fsdp`): weights sharded over the fsdp axis of a (data, fsdp) mesh give the same search path.

The `mu` search (synthetic Fashion-MNIST-format data) runs on the 8 fake devices with mesh.fsdp=4 (data=2),
with mesh.fsdp=1 (data parallel) and on a 1-device mesh; the three share one dense stage (a copied workdir).
Every path point must agree: t_in, steps in support and the support per group exactly, the floats closely.
"""

from __future__ import annotations

import functools
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs.vit import get_config
from spp_jax import checkpoint, run, sharding
from spp_jax.errors import ConfigError
from spp_jax.run_config import validate_config
from tests.helpers import write_synthetic_fashion_mnist

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)


def assert_same_path(a_dir, b_dir) -> None:
    """Same path points: t_in, steps in support and the records' support exactly, the floats closely."""
    a = checkpoint.PathStore(a_dir / "search" / "path", read_only=True)
    b = checkpoint.PathStore(b_dir / "search" / "path", read_only=True)
    assert a.steps() == b.steps() and a.steps()
    for s in a.steps():
        x, y = a.arrays(s), b.arrays(s)
        for key in ("t_in", "steps_in_support"):
            jax.tree.map(np.testing.assert_array_equal, x[key], y[key])
        for key in ("gamma", "z", "masks"):
            jax.tree.map(close, x[key], y[key])
        jax.tree.map(lambda g, h: np.testing.assert_array_equal(g != 0, h != 0), x["gamma"], y["gamma"])
        ra, rb = a.record(s), b.record(s)
        assert ra["support"] == rb["support"], s
        for k, v in ra.items():
            if k not in ("support", "checksum", "step"):
                close(v, rb[k], err_msg=f"{k} at step {s}")


@pytest.fixture(scope="module")
def mu_cfg(tmp_path_factory):
    idx = tmp_path_factory.mktemp("idx")
    write_synthetic_fashion_mnist(idx)
    mp = pytest.MonkeyPatch()
    mp.setenv("SPP_FASHION_MNIST_DIR", str(idx))
    cfg = get_config("mu")
    cfg.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
    yield cfg
    mp.undo()


@pytest.fixture(scope="module")
def dense_wd(mu_cfg, tmp_path_factory):
    wd = tmp_path_factory.mktemp("dense") / "wd"
    run.run_all(mu_cfg, wd, until="dense")
    return wd


def _search_copy(cfg, dense_wd, wd, fsdp: int = 1):
    shutil.copytree(dense_wd, wd)
    cfg = cfg.copy_and_resolve_references()
    cfg.mesh.fsdp = fsdp
    run.run_all(cfg, wd, until="search")
    return wd


@pytest.fixture(scope="module")
def fsdp4(mu_cfg, dense_wd, tmp_path_factory):
    """The search with mesh.fsdp=4, recording every tree `jax.device_put` placed."""
    placed = []
    put = jax.device_put

    def spy(x, *args, **kwargs):
        out = put(x, *args, **kwargs)
        placed.append(out)
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(jax, "device_put", spy)
    try:
        wd = _search_copy(mu_cfg, dense_wd, tmp_path_factory.mktemp("fsdp4") / "wd", fsdp=4)
    finally:
        mp.undo()
    return wd, placed


@pytest.fixture(scope="module")
def fsdp1(mu_cfg, dense_wd, tmp_path_factory):
    return _search_copy(mu_cfg, dense_wd, tmp_path_factory.mktemp("fsdp1") / "wd")


def test_fsdp4_gives_the_data_parallel_path(fsdp4, fsdp1):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    assert_same_path(fsdp1, fsdp4[0])


def test_fsdp4_gives_the_one_device_path(mu_cfg, dense_wd, fsdp4, tmp_path, monkeypatch):
    make = sharding.make_mesh
    monkeypatch.setattr(sharding, "make_mesh", lambda devices=None, fsdp=1: make(jax.devices()[:1], fsdp))
    one = _search_copy(mu_cfg, dense_wd, tmp_path / "wd")
    assert_same_path(one, fsdp4[0])


def test_the_search_weights_are_really_sharded(fsdp4):
    _, placed = fsdp4
    sharded = [
        leaf
        for tree in placed
        for leaf in jax.tree.leaves(tree)
        if isinstance(leaf, jax.Array)
        and isinstance(leaf.sharding, NamedSharding)
        and sharding.FSDP_AXIS in jax.tree.leaves(tuple(leaf.sharding.spec))
    ]
    assert sharded, "no weight was placed with an fsdp sharding"
    for leaf in sharded:
        assert dict(leaf.sharding.mesh.shape) == {"data": 2, "fsdp": 4}
        shard = leaf.addressable_shards[0].data
        assert shard.size * 4 == leaf.size and shard.shape != leaf.shape
    kernels = [leaf for leaf in sharded if leaf.ndim >= 2]
    assert kernels  # the matmul weights, not only vectors


def test_fsdp_rule_shards_the_largest_divisible_axis():
    assert sharding.fsdp_spec((384, 1536), 4) == PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((1536, 384), 4) == PartitionSpec("fsdp")
    assert sharding.fsdp_spec((4096, 4096), 8) == PartitionSpec("fsdp")  # equal axes: the first
    assert sharding.fsdp_spec((3, 5, 4096), 4) == PartitionSpec(None, None, "fsdp")
    assert sharding.fsdp_spec((1022, 6), 4) == PartitionSpec()  # no divisible axis: replicated
    assert sharding.fsdp_spec((384,), 4) == PartitionSpec()  # small: replicated
    assert sharding.fsdp_spec((), 4) == PartitionSpec()
    assert sharding.fsdp_spec((4096, 4096), 1) == PartitionSpec()


def test_an_fsdp_size_that_does_not_divide_the_devices_is_a_one_line_error(mu_cfg):
    cfg = mu_cfg.copy_and_resolve_references()
    for bad in (3, 16):
        cfg.mesh.fsdp = bad
        with pytest.raises(ConfigError, match=rf"mesh\.fsdp={bad} does not divide the 8 devices") as err:
            validate_config(cfg)
        assert "\n" not in str(err.value)
    cfg.mesh.fsdp = 0
    with pytest.raises(ConfigError, match=r"mesh\.fsdp=0 is not allowed"):
        validate_config(cfg)
