"""Adapter conformance, for every registered architecture (spp_jax.architectures.ARCHITECTURES): the
contract that path, selection and extraction code relies on, checked on each architecture's tiny random
instance (`Architecture.tiny_example`)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from spp_jax import checkpoint
from spp_jax.architectures import ARCHITECTURES, architecture_class
from spp_jax.errors import ConfigError

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
def test_duplicate_mask_groups_are_a_one_line_config_error(name):
    """Every adapter refuses a mask group named twice (its masks would be one entry), as it refuses an
    unknown one; a two-tower adapter in either tower."""
    adapter, _, _ = _example(name)
    fields = [f for f in ("groups", "image_groups", "text_groups") if hasattr(adapter, f)]
    for field in fields:
        groups = getattr(adapter, field) or ("qk",)
        with pytest.raises(ConfigError, match="mask groups") as err:
            dataclasses.replace(adapter, **{field: (*groups, groups[0])})
        assert "\n" not in str(err.value)


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


def _random_record(spec, seed: int) -> dict:
    """A path-shaped record with ties (t_in on a coarse grid) so that the tie-breaks are exercised."""
    rng = np.random.default_rng(seed)
    t_in = {g.name: rng.integers(0, 6, g.shape).astype(np.float32) for g in spec.groups}
    for g in spec.groups:  # some entries never entered
        t_in[g.name][rng.random(g.shape) < 0.2] = np.inf
    return {
        "t_in": t_in,
        "steps_in_support": {g.name: rng.integers(0, 3, g.shape) for g in spec.groups},
        "z": {g.name: rng.normal(size=g.shape).astype(np.float32) for g in spec.groups},
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_family_member_equals_the_extracted_model(name, tmp_path):
    """Before any training, the member a family cuts for a target is the model extraction makes for it (the
    same function, entries in another order; logits within 1e-5), for every target kind and round_to, also
    after a save and a load."""
    from spp_jax import baselines, family, selection

    adapter, params, inputs = _example(name, seed=2)
    spec = adapter.mask_spec()
    path = _random_record(spec, 5)  # a step target reads the path's own record, not the allocated one
    record = baselines.allocate(spec, path, "per_group")
    fam = family.build_family(adapter, params, record, {"round_to": 2})
    fam_path = family.build_family(adapter, params, path)
    at_step = {**path, "gamma": {k: (v <= 3).astype(np.float32) for k, v in path["t_in"].items()}}
    family.save_family(tmp_path / "family", fam)
    cases = [("params:0.8", 1), ("params:0.45", 2), ("flops:0.7", 1), ("groups:0.6", 2), ("step:3", 1)]
    for target, round_to in cases:
        member, source = (fam_path, at_step) if target.startswith("step") else (fam, record)
        keep = selection.select_subnetwork(spec, source, target, round_to=round_to)
        small, arch = adapter.extract(params, keep)
        cut, cut_arch = member.cut(target, round_to)
        assert adapter.arch_cost(cut_arch) == adapter.arch_cost(arch)
        np.testing.assert_allclose(
            _apply(adapter, cut, inputs, arch_spec=cut_arch), _apply(adapter, small, inputs, arch_spec=arch),
            atol=1e-5, rtol=1e-5,
        )  # fmt: skip
        in_dense = adapter.normalize_keep(member.dense_keep(member.keep(target, round_to)))
        for g, k in adapter.normalize_keep(keep).items():
            np.testing.assert_array_equal(in_dense[g], k)
    _, loaded, arch = family.load_pruned(tmp_path / "family", target="params:0.45")  # round_to 2 as saved
    ref, ref_arch = fam.cut("params:0.45", 2)
    assert arch == ref_arch
    jax.tree.map(np.testing.assert_array_equal, loaded, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_member_slicer_cuts_the_member_inside_jit(name):
    """The traced cut of the nested fine-tune gives the numpy cut's arrays, and its gradient reaches only the
    family entries the member uses."""
    from spp_jax import baselines, family

    adapter, params, inputs = _example(name, seed=1)
    spec = adapter.mask_spec()
    fam = family.build_family(adapter, params, baselines.allocate(spec, _random_record(spec, 7), "per_group"))
    keep = fam.keep("params:0.6")
    slicer, apply, arch = family.member_apply(fam, keep)
    expected, expected_arch = fam.cut("params:0.6")
    assert arch == expected_arch
    got = jax.jit(slicer)(fam.params)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    out = lambda p: apply({"params": slicer(p)}, *inputs)
    loss = lambda p: sum(jax.numpy.sum(x.astype(jax.numpy.float32) ** 2) for x in jax.tree.leaves(out(p)))
    grads = jax.grad(loss)(jax.tree.map(jax.numpy.asarray, fam.params))
    n_used = sum(int(np.count_nonzero(g)) for g in jax.tree.leaves(grads))
    assert 0 < n_used <= _count(expected)
