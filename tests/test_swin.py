"""Masked Swin: window geometry and shift mask, dense equivalence, extraction, declared costs, wanda sows."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax import baselines
from spp_jax.adapters.base import adapter_from_spec
from spp_jax.adapters.swin import SwinAdapter, swin_cost
from spp_jax.architectures.swin import VARIANT_NAMES, SwinArchitecture, fit_head, tiny_params
from spp_jax.errors import ConfigError
from spp_jax.models.swin import KINDS, VARIANTS, SwinBlock, SwinConfig, SwinTransformer, swin_config
from spp_jax.models.swin_attention import (
    WindowAttention,
    relative_position_index,
    shift_mask,
    to_windows,
    window_geometry,
)
from spp_jax.models.vit import LayerDims


@functools.cache
def _params(config: SwinConfig, seed: int) -> dict:
    return tiny_params(SwinAdapter(config), seed)


def setup(groups: tuple[str, ...] = KINDS, seed: int = 0, **overrides):
    """(adapter, params, images) of the "mu" Swin with 5 classes; `tiny_params` are its params."""
    adapter = SwinAdapter(swin_config("mu", num_classes=5, **overrides), groups)
    c = adapter.config
    x = jax.random.normal(jax.random.key(seed), (2, c.image_size, c.image_size, 3))
    return adapter, _params(c, seed), x


@functools.cache
def _forward(module: SwinTransformer):
    return jax.jit(lambda p, v, m: module.apply({"params": p}, v, masks=m))


def run(adapter, params, x, masks=None, arch_spec=None) -> np.ndarray:
    """The model's output, jitted once per module (op-by-op dispatch compiles each op of a new shape)."""
    return np.asarray(_forward(adapter.module(arch_spec))(params, x, masks))


def count(tree) -> int:
    return sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------ config
def test_variants_and_config_errors():
    assert set(VARIANT_NAMES) == set(VARIANTS)
    t = swin_config("T")
    assert (t.embed_dim, t.depths, t.num_heads, t.window_size, t.image_size) == (
        96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224
    )  # fmt: skip
    assert swin_config("B").num_heads == (4, 8, 16, 32) and swin_config("S").depths == (2, 2, 18, 2)
    assert (t.dim(3), t.head_dim(3), t.mlp_dim(3), t.sides()) == (768, 32, 3072, (56, 28, 14, 7))
    c = swin_config("mu", num_classes=3, droppath_rate=0.1)
    assert SwinConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    with pytest.raises(ConfigError, match="unknown Swin variant 'L'"):
        swin_config("L")
    with pytest.raises(ConfigError, match="not divisible by its 3 heads"):
        swin_config("mu", num_heads=(3, 2))
    with pytest.raises(ConfigError, match="equal length"):
        swin_config("mu", depths=(2, 2, 2))
    with pytest.raises(ConfigError, match="not a multiple of patch_size 2"):
        swin_config("mu", image_size=33)


@pytest.mark.parametrize("variant", ["T", "S", "B"])
def test_cost_counts_every_param_of_the_published_sizes(variant):
    c = swin_config(variant)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(SwinTransformer(c).init, jax.random.key(0), x)["params"]
    params, macs = swin_cost(c, c.dense_layers())
    assert params == count(shapes)
    # the published sizes: T 28.3M / 4.5G, S 49.6M / 8.7G, B 87.8M / 15.4G (multiply-accumulates)
    want = {"T": (28.29e6, 4.49e9), "S": (49.61e6, 8.74e9), "B": (87.77e6, 15.43e9)}[variant]
    assert params == pytest.approx(want[0], rel=1e-3) and macs == pytest.approx(want[1], rel=1e-3)


# --------------------------------------------------------------------------------- windows and shift
def test_window_geometry_follows_the_original_rules():
    assert window_geometry(8, 8, 4, False) == (4, 0, 8, 8)
    assert window_geometry(8, 8, 4, True) == (4, 2, 8, 8)
    assert window_geometry(10, 10, 4, True) == (4, 2, 12, 12)  # padded to whole windows
    assert window_geometry(4, 4, 4, True) == (4, 0, 4, 4)  # map side == window: no shift
    assert window_geometry(3, 5, 7, True) == (3, 0, 3, 6)  # shrunk to the smaller side


@pytest.mark.parametrize(("side", "win", "shift"), [(8, 4, 2), (12, 4, 2), (14, 7, 3), (21, 7, 3)])
def test_shift_mask_separates_what_the_roll_brought_together(side, win, shift):
    """Two tokens of one rolled window may attend iff they are less than a window apart on the unrolled
    map along both axes (the roll wraps the far edge next to the near one)."""
    orig = (np.arange(side) + shift) % side  # unrolled coordinate of each rolled position
    ys, xs = np.meshgrid(orig, orig, indexing="ij")
    coords = to_windows(np.stack([ys, xs], -1)[None].astype(np.int64), win)[0]  # [windows, T, 2]
    dist = np.abs(coords[:, :, None, :] - coords[:, None, :, :]).max(-1)
    mask = shift_mask(side, side, win, shift)
    assert mask.shape == (len(coords), win * win, win * win)
    np.testing.assert_array_equal(mask == 0, dist < win)
    assert (mask != 0).any() and set(np.unique(mask)) == {0.0, -100.0}


def test_shifted_block_attends_only_inside_its_window():
    """Perturbing one token of a shifted block changes exactly the tokens of its window and region."""
    c = swin_config("mu")
    dims = c.dense_layers()[1]
    block = SwinBlock(c, 0, dims, shifted=True)
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, c.embed_dim))
    params = jax.jit(lambda k: block.init(k, x, {}, False))(jax.random.key(1))
    fwd = jax.jit(lambda v: block.apply(params, v, {}, False))
    base = np.asarray(fwd(x))
    win, shift = 4, 2
    bump = jnp.arange(c.embed_dim) / 4.0  # not a constant: LayerNorm would remove a constant shift
    for r, col in [(0, 0), (15, 14), (1, 13), (6, 9)]:
        changed = np.abs(np.asarray(fwd(x.at[0, r, col].add(bump))) - base).max(-1)[0] > 1e-6
        rolled = lambda i: (i - shift) % 16 // win  # window row/col of an unrolled position
        rr, cc = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
        same_window = (rolled(rr) == rolled(r)) & (rolled(cc) == rolled(col))
        near = (np.abs(rr - r) < win) & (np.abs(cc - col) < win)
        np.testing.assert_array_equal(changed, same_window & near)


def test_shrunk_window_reads_the_table_centre():
    """A window shrunk from 4 to 2 reads the bias table like a window-2 model with the centre crop."""
    dims = LayerDims(2, 8, 8, 0)
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 16))  # 3 windows of 2x2 tokens
    big = WindowAttention(dims, 16, 8, table_window=4)
    params = big.init(jax.random.key(1), x, 2, None, {})["params"]
    table = np.asarray(params["relative_position_bias_table"]).reshape(7, 7, 2)
    small = {**params, "relative_position_bias_table": table[2:5, 2:5].reshape(9, 2)}
    got = big.apply({"params": params}, x, 2, None, {})
    want = WindowAttention(dims, 16, 8, table_window=2).apply({"params": small}, x, 2, None, {})
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert relative_position_index(7, 7).max() == 168 and relative_position_index(7, 7)[0, 0] == 84


# ------------------------------------------------------------------------------------------- masks
def test_mu_forward_under_jit_at_several_sizes():
    a, params, x = setup()
    fwd = jax.jit(lambda p, v: a.module().apply({"params": p}, v))
    assert fwd(params, x).shape == (2, 5)
    for size in (6, 38):  # shrunk windows (3x3 tokens); padding and odd merging (19x19 tokens)
        out = fwd(params, jnp.ones((1, size, size, 3)))
        assert out.shape == (1, 5) and np.isfinite(out).all()


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_droppath_is_active_only_in_training(rate):
    a, params, x = setup()
    module = SwinTransformer(dataclasses.replace(a.config, droppath_rate=rate))
    train = jax.jit(lambda k: module.apply({"params": params}, x, train=True, rngs={"dropout": k}))
    one, two = train(jax.random.key(0)), train(jax.random.key(1))
    if rate:
        assert not np.allclose(one, two) and not np.allclose(one, run(a, params, x))
    else:
        np.testing.assert_allclose(one, run(a, params, x), atol=1e-6)


@pytest.mark.parametrize("groups", [("qk", "vo", "mlp"), KINDS])
def test_all_ones_masks_equal_dense_exactly(groups):
    a, params, x = setup(groups)
    ones = a.mask_spec().init_masks()
    assert {k: v.shape for k, v in ones.items()}["stage1/mlp"] == (2, 128)
    np.testing.assert_array_equal(run(a, params, x, ones), run(a, params, x))


def test_a_stage_mask_reaches_only_its_stage():
    """Masking stage1/mlp to 0 (before the GELU) == zeroing stage 1's fc1; stage 0 untouched."""
    a, params, x = setup(("mlp",))
    masks = {k: np.ones(v.shape, np.float32) for k, v in a.mask_spec().init_masks().items()}
    masks["stage1/mlp"][:] = 0.0
    zeroed = jax.tree.map(np.array, params)
    for i in range(2):
        fc1 = zeroed["stage_1"][f"block_{i}"]["mlp"]["fc1"]
        fc1["kernel"][:], fc1["bias"][:] = 0.0, 0.0
    np.testing.assert_allclose(run(a, params, x, masks), run(a, zeroed, x), atol=1e-6)
    assert not np.allclose(run(a, params, x, masks), run(a, params, x), atol=1e-3)


def keep_with_dead_blocks(spec, seed: int, kind: str) -> dict[str, np.ndarray]:
    """Random keep-set in which block 0 of stage 0 and block 1 of stage 1 lose every entry of `kind`."""
    rng = np.random.default_rng(seed)
    keep = {g.name: rng.random(g.shape) < 0.6 for g in spec.groups}
    for s, i in ((0, 0), (1, 1)):
        if f"stage{s}/{kind}" in keep:
            keep[f"stage{s}/{kind}"][i] = False
    return keep


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("image_size", [32, 40])  # 40: stage 1 padded from 10x10 to 12x12 tokens
def test_extracted_equals_binary_masked_and_costs_match(kind, image_size):
    groups = ("qk", "vo", "mlp") if kind != "heads" else ("heads", "mlp")  # both have exact costs
    a, params, x = setup(groups, image_size=image_size)
    spec = a.mask_spec()
    keep = a.normalize_keep(keep_with_dead_blocks(spec, 1, kind))
    small, arch_spec = a.extract(params, keep)
    masks = {k: v.astype(np.float32) for k, v in keep.items()}
    np.testing.assert_allclose(
        run(a, small, x, arch_spec=arch_spec), run(a, params, x, masks), atol=2e-5, rtol=2e-5
    )
    n_params, macs = a.arch_cost(arch_spec)
    assert n_params == count(small)
    if all(g.exact_cost for g in spec.groups):
        assert spec.kept_cost(keep) == pytest.approx((n_params, macs))
    dims = arch_spec["layers"][0]
    if kind in ("vo", "heads"):  # the attention branch of block 0 is gone
        assert dims["v_dim"] == dims["qk_dim"] == 0
        assert ("relative_position_bias_table" in small["stage_0"]["block_0"]["attn"]) == (kind == "vo")
    else:
        assert dims[{"qk": "qk_dim", "mlp": "mlp_dim"}[kind]] == 0
    assert adapter_from_spec(json.loads(json.dumps(arch_spec))).arch_cost(arch_spec) == (n_params, macs)


def test_dense_cost_and_spec_totals():
    for groups in (("qk", "vo", "mlp"), ("heads",), ("vo", "mlp")):
        a, params, _ = setup(groups, image_size=40)
        spec = a.mask_spec()
        assert a.arch_cost(a.dense_spec())[0] == count(params)
        assert (spec.total_params, spec.total_macs) == pytest.approx(a.arch_cost(a.dense_spec()))
        assert [g.name for g in spec.groups][: len(groups)] == [f"stage0/{g}" for g in groups]
    assert not a.mask_spec().group("stage0/vo").exact_cost  # vo without qk: an upper bound
    # stage 1 of mu at 40 px: 10x10 tokens padded to 12x12, windows of 16 tokens, C = 32, 2 heads
    qk = setup(("qk", "vo", "mlp"), image_size=40)[0].mask_spec().group("stage1/qk")
    assert (qk.params_per_entry, qk.macs_per_entry) == (2 * 2 * 33, 144 * (2 * 2 * 32 + 16 * 2))


def test_fold_masks_keeps_continuous_mask_values():
    a, params, x = setup()
    spec = a.mask_spec()
    keep = a.normalize_keep(keep_with_dead_blocks(spec, 2, "qk"))
    rng = np.random.default_rng(3)
    values = {k: (0.5 + rng.random(v.shape)).astype(np.float32) for k, v in keep.items()}
    small, arch_spec = a.extract(params, keep, masks=values, fold_masks=True)
    masked = {k: values[k] * keep[k] for k in keep}
    np.testing.assert_allclose(run(a, small, x, arch_spec=arch_spec), run(a, params, x, masked), atol=2e-5)


# ------------------------------------------------------------------------------------------- wanda
def test_wanda_reads_the_stage_prefixed_sows():
    a, params, x = setup()
    batch = {"image": x, "label": np.zeros(2, np.int32)}
    spec = a.mask_spec()
    act = baselines.mask_input_norms(a.module().apply, spec, params, [batch])
    assert {k: v.shape for k, v in act.items()} == {g.name: g.shape for g in spec.groups}
    # stage1/mlp: the L2 norm of stage 1 block 0's fc1 output over every example and token
    capture = lambda p: a.module().apply(
        {"params": p}, x, capture_intermediates=True, mutable=["intermediates"]
    )
    mods = jax.jit(capture)(params)[1]
    fc1 = mods["intermediates"]["stage_1"]["block_0"]["mlp"]["fc1"]["__call__"][0]
    want = np.sqrt(np.square(np.asarray(fc1, np.float64)).sum(axis=(0, 1, 2)))
    np.testing.assert_allclose(act["stage1/mlp"][0], want, rtol=1e-5)
    scores = baselines.importance_scores("wanda", spec, adapter=a, params=params, batches=[batch])
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in scores.values())
    mag = a.entry_weight_norms(params)
    assert {k: v.shape for k, v in mag.items()} == {g.name: g.shape for g in spec.groups}


# ------------------------------------------------------------------------------------ architecture
def test_architecture_entry(tmp_path):
    import ml_collections

    arch = SwinArchitecture()
    cfg = ml_collections.ConfigDict(
        {
            "seed": 0,
            "model": {"arch": "swin", "variant": "mu", "init": "random", "init_path": "", "image_size": 32,
                      "groups": ("qk", "vo", "mlp")},
        }
    )  # fmt: skip
    a = arch.build_adapter(cfg, None, num_classes=7)
    assert a.config.num_classes == 7 and [g.name for g in a.mask_spec().groups][-1] == "stage1/mlp"
    params = arch.load_pretrained(cfg, a)
    assert count(params) == a.arch_cost(a.dense_spec())[0]
    feats = jax.jit(arch.feature_module(a).apply)({"params": params}, jnp.zeros((1, 32, 32, 3)))
    assert feats.shape == (1, 32)
    assert arch.fingerprint(cfg)["droppath_rate"] == 0.0 and arch.report_model(cfg)["variant"] == "mu"
    cfg.model.droppath_rate = 1.5
    with pytest.raises(ConfigError, match=r"model\.droppath_rate=1\.5"):
        arch.build_adapter(cfg, None, num_classes=7)
    cfg.model.droppath_rate = 0.1
    cfg.model.init, cfg.model.init_path = "hf", str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"Hugging Face Swin directory of model\.init=hf"):
        arch.check_init(cfg)
    head = fit_head({"head": {"kernel": np.ones((32, 5)), "bias": np.ones(5)}}, a.config)["head"]
    assert head["kernel"].shape == (32, 7) and not head["kernel"].any()
    assert "head" not in fit_head({"head": head}, swin_config("mu", num_classes=0))
