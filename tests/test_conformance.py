"""Adapter conformance, for every registered architecture (spp_jax.architectures.ARCHITECTURES): the
contract that path, selection and extraction code relies on, checked on each architecture's tiny random
instance (`Architecture.tiny_example`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from spp_jax import checkpoint
from spp_jax.architectures import ARCHITECTURES, architecture_class

ARCHS = sorted(ARCHITECTURES)


def _example(name: str, groups=None, seed: int = 0):
    return architecture_class(name)().tiny_example(groups, seed)


def _flat(out) -> np.ndarray:
    """A model's output as one array (a multi-output model, e.g. two towers, gives a tuple)."""
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(out)])


def _apply(adapter, params, inputs, masks=None, arch_spec=None):
    return _flat(adapter.module(arch_spec).apply({"params": params}, *inputs, masks=masks))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ARCHS)
def test_all_ones_masks_give_the_dense_function(name):
    adapter, params, inputs = _example(name)
    dense = _apply(adapter, params, inputs)
    np.testing.assert_array_equal(_apply(adapter, params, inputs, adapter.mask_spec().init_masks()), dense)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_extracted_equals_binary_masked_and_costs_match(name, seed):
    adapter, params, inputs = _example(name, groups=None, seed=seed)
    spec = adapter.mask_spec()
    rng = np.random.default_rng(seed)
    keep = {g.name: rng.random(g.shape) < 0.6 for g in spec.groups}
    first = spec.groups[0]
    keep[first.name][0] = False  # one layer loses the whole first group
    keep = adapter.normalize_keep(keep)
    small, arch_spec = adapter.extract(params, keep)
    masks = {k: np.asarray(v, np.float32) for k, v in keep.items()}
    np.testing.assert_allclose(
        _apply(adapter, small, inputs, arch_spec=arch_spec), _apply(adapter, params, inputs, masks),
        atol=2e-5, rtol=2e-5,
    )  # fmt: skip
    n_params, macs = adapter.arch_cost(arch_spec)
    assert n_params == _count(small)
    declared = spec.kept_cost(keep)
    if all(g.exact_cost for g in spec.groups):
        assert declared == pytest.approx((n_params, macs))
    assert adapter.arch_cost(adapter.dense_spec())[0] == _count(params)


@pytest.mark.parametrize("name", ARCHS)
def test_exact_groups_declare_the_counted_cost(name):
    adapter, params, _ = _example(name, groups=("qk", "vo", "mlp"))
    spec = adapter.mask_spec()
    keep = adapter.normalize_keep(
        {g.name: np.random.default_rng(3).random(g.shape) < 0.5 for g in spec.groups}
    )
    small, arch_spec = adapter.extract(params, keep)
    assert spec.kept_cost(keep) == pytest.approx(adapter.arch_cost(arch_spec))
    assert spec.total_params == pytest.approx(_count(params))


@pytest.mark.parametrize("name", ARCHS)
def test_saved_pruned_model_loads_and_runs_alone(name, tmp_path):
    adapter, params, inputs = _example(name)
    spec = adapter.mask_spec()
    keep = {g.name: np.random.default_rng(5).random(g.shape) < 0.5 for g in spec.groups}
    small, arch_spec = adapter.extract(params, keep)
    checkpoint.save_model(tmp_path / "m", small, arch_spec)
    module, loaded, spec_back = checkpoint.load_pruned(tmp_path / "m")
    assert spec_back == arch_spec
    np.testing.assert_array_equal(
        _flat(module.apply({"params": loaded}, *inputs)),
        _apply(adapter, small, inputs, arch_spec=arch_spec),
    )
