"""Extraction (algorithm.md §5): extracted model == binary-masked dense model, edge cases, costs."""

import jax
import numpy as np
import pytest

from spp_jax.adapters import adapter_from_spec
from spp_jax.errors import CheckpointMismatch, ConfigError
from tests.helpers import as_masks, mu_adapter, random_images, random_keep, random_params

ALL = ("qk", "vo", "mlp", "heads")


def _check_equivalent(a, params, x, keep, masks=None, fold=False, atol=2e-5):
    m = a.module()
    run_masks = as_masks(keep) if masks is None else {k: masks[k] * keep[k] for k in keep}
    expected = m.apply({"params": params}, x, masks=run_masks)
    small, spec = a.extract(params, keep, masks=masks, fold_masks=fold)
    got = a.module(spec).apply({"params": small}, x)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=atol, rtol=1e-5)
    return small, spec


@pytest.mark.parametrize("groups", [("qk", "vo", "mlp"), ALL])
@pytest.mark.parametrize("seed", range(4))
def test_extracted_equals_binary_masked(groups, seed):
    a = mu_adapter(groups)
    params, x = random_params(a, seed), random_images(a, seed=seed)
    keep = random_keep(a.mask_spec(), np.random.default_rng(seed), p=0.3 + 0.15 * seed)
    _check_equivalent(a, params, x, keep)


EDGE_CASES = {
    "all_vo_pruned": lambda k: k["vo"].__setitem__(0, False),
    "all_qk_pruned_vo_kept": lambda k: (k["qk"].__setitem__(0, False), k["vo"].__setitem__(0, True)),
    "all_mlp_pruned": lambda k: k["mlp"].__setitem__(1, False),
    "all_heads_pruned": lambda k: k["heads"].__setitem__(1, False),
    "everything_pruned": lambda k: [v.__setitem__(slice(None), False) for v in k.values()],
    "nothing_pruned": lambda k: [v.__setitem__(slice(None), True) for v in k.values()],
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_are_defined(case):
    a = mu_adapter(ALL)
    params, x = random_params(a), random_images(a)
    keep = random_keep(a.mask_spec(), np.random.default_rng(7), p=0.6)
    EDGE_CASES[case](keep)
    small, spec = _check_equivalent(a, params, x, keep)
    if case == "all_vo_pruned":
        assert spec["layers"][0]["v_dim"] == 0 and spec["layers"][0]["qk_dim"] == 0
        assert set(small["encoderblock_0"]["attn"]) == {"out"}
    if case == "all_mlp_pruned":
        assert spec["layers"][1]["mlp_dim"] == 0


@pytest.mark.parametrize("pre_act", [True, False])
def test_fold_masks_equals_continuous_masked_model(pre_act):
    a = mu_adapter(ALL, mlp_mask_pre_act=pre_act)
    params, x = random_params(a), random_images(a)
    spec = a.mask_spec()
    rng = np.random.default_rng(3)
    keep = random_keep(spec, rng, p=0.6)
    masks = {
        g.name: jax.numpy.asarray(rng.uniform(0.2, 1.5, g.shape), jax.numpy.float32) for g in spec.groups
    }
    _check_equivalent(a, params, x, keep, masks=masks, fold=True)
    # Without folding the kept entries are reset to 1: the function differs from the continuous one.
    small, arch = a.extract(params, keep)
    got = a.module(arch).apply({"params": small}, x)
    cont = a.module().apply({"params": params}, x, masks={k: masks[k] * keep[k] for k in keep})
    assert not np.allclose(got, cont, atol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_extracted_cost_matches_declaration_and_tree(seed):
    a = mu_adapter()
    params = random_params(a)
    spec = a.mask_spec()
    keep = random_keep(spec, np.random.default_rng(seed), p=0.4)
    keep["vo"][seed % 2] = False  # a layer without attention: its qk entries cost nothing
    small, arch = a.extract(params, keep)
    n_tree = sum(v.size for v in jax.tree.leaves(small))
    params_arch, macs_arch = a.arch_cost(arch)
    params_decl, macs_decl = spec.kept_cost(a.normalize_keep(keep))
    assert n_tree == params_arch == params_decl
    assert macs_arch == macs_decl
    assert params_arch < spec.total_params


def test_spec_alone_rebuilds_a_module_with_matching_shapes():
    a = mu_adapter(ALL)
    params = random_params(a)
    keep = random_keep(a.mask_spec(), np.random.default_rng(5), p=0.5)
    small, arch = a.extract(params, keep)
    rebuilt = adapter_from_spec(arch)
    x = random_images(a, n=1)
    init_shapes = jax.eval_shape(lambda: rebuilt.module(arch).init(jax.random.key(0), x))["params"]
    assert jax.tree.map(lambda s: s.shape, init_shapes) == jax.tree.map(lambda v: v.shape, small)


def test_extraction_errors():
    a = mu_adapter()
    params = random_params(a)
    keep = random_keep(a.mask_spec(), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="fold_masks"):
        a.extract(params, keep, fold_masks=True)
    with pytest.raises(ValueError, match="do not match"):
        a.extract(params, {"qk": keep["qk"]})
    with pytest.raises(CheckpointMismatch, match="encoderblock_1"):
        a.extract({k: v for k, v in params.items() if k != "encoderblock_1"}, keep)
    with pytest.raises(CheckpointMismatch, match="arch"):
        adapter_from_spec({"arch": "resnet"})


def test_vo_without_qk_declares_the_counted_cost_while_every_layer_keeps_a_value_dim():
    """W_q/W_k are no group here; they are base cost, exact as long as no layer drops every vo entry."""
    adapter = mu_adapter(groups=("vo", "mlp"))
    spec = adapter.mask_spec()
    assert not spec.group("vo").exact_cost and spec.group("mlp").exact_cost
    rng = np.random.default_rng(0)
    keep = {gr.name: rng.random(gr.shape) < 0.5 for gr in spec.groups}
    keep["vo"][:, 0] = True
    keep = adapter.normalize_keep(keep)
    arch = adapter.extract(random_params(adapter), keep)[1]
    assert spec.kept_cost(keep) == pytest.approx(adapter.arch_cost(arch))
    keep["vo"][0] = False  # a layer without value dims drops W_q/W_k too: the declared cost is an upper bound
    arch = adapter.extract(random_params(adapter), keep)[1]
    assert all(a > b for a, b in zip(spec.kept_cost(keep), adapter.arch_cost(arch), strict=True))
