"""Two-tower (CLIP) model and adapter: dense equivalence, prefixed mask routing, extraction == binary masking
with random keep-sets per tower, declared == counted cost, wanda/magnitude scores under the prefixed groups,
and the config / group-name plumbing. (tests/test_conformance.py checks the registered entry as well.)"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax import baselines
from spp_jax.adapters.clip import ClipAdapter
from spp_jax.adapters.vit import ViTAdapter
from spp_jax.architectures.clip import VARIANT_NAMES, ClipArchitecture, tower_groups
from spp_jax.errors import ConfigError
from spp_jax.models.clip import VARIANTS, ClipConfig, TwoTower, clip_config
from spp_jax.models.vit import ViTConfig

ALL = ("qk", "vo", "mlp", "heads")


@pytest.fixture(scope="module")
def example():
    """(adapter with every kind in both towers, params, (images, input_ids, attention_mask))."""
    return ClipArchitecture().tiny_example(None, 0)


def run(adapter, params, inputs, masks=None, arch_spec=None):
    out = adapter.module(arch_spec).apply({"params": params}, *inputs, masks=masks)
    return tuple(np.asarray(x) for x in out)


def count(tree) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def random_keep(spec, seed: int, p: float = 0.6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g.name: rng.random(g.shape) < p for g in spec.groups}


def test_all_ones_masks_are_dense_and_encoders_match_call(example):
    adapter, params, inputs = example
    spec = adapter.mask_spec()
    assert set(spec.names) == {f"{t}/{k}" for t in ("image", "text") for k in ALL}
    dense = run(adapter, params, inputs)
    for a, b in zip(run(adapter, params, inputs, spec.init_masks()), dense, strict=True):
        np.testing.assert_array_equal(a, b)
    image_emb, text_emb, scale = dense
    assert image_emb.shape == (2, 16) and text_emb.shape == (3, 16) and scale.shape == ()
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(scale, np.exp(params["logit_scale"]), rtol=1e-6)
    m, v = adapter.module(), {"params": params}
    np.testing.assert_array_equal(np.asarray(m.apply(v, inputs[0], method="encode_image")), image_emb)
    np.testing.assert_array_equal(np.asarray(m.apply(v, *inputs[1:], method="encode_text")), text_emb)


def test_prefixed_masks_reach_only_their_tower(example):
    adapter, params, inputs = example
    image_emb, text_emb, _ = run(adapter, params, inputs)
    zero_mlp = {"text/mlp": jnp.zeros(adapter.mask_spec().group("text/mlp").shape)}
    img2, txt2, _ = run(adapter, params, inputs, zero_mlp)
    np.testing.assert_array_equal(img2, image_emb)
    assert np.abs(txt2 - text_emb).max() > 1e-3
    zero_qk = {"image/qk": jnp.zeros(adapter.mask_spec().group("image/qk").shape)}
    img3, txt3, _ = run(adapter, params, inputs, zero_qk)
    np.testing.assert_array_equal(txt3, text_emb)
    assert np.abs(img3 - image_emb).max() > 1e-3
    with pytest.raises(ConfigError, match="names no tower"):
        run(adapter, params, inputs, {"mlp": zero_mlp["text/mlp"]})


def test_padding_does_not_change_a_text(example):
    adapter, params, (images, ids, mask) = example
    _, text_emb, _ = run(adapter, params, (images, ids, mask))
    n = int(mask[1].sum())
    _, alone, _ = run(adapter, params, (images, ids[1:2, :n], mask[1:2, :n]))
    np.testing.assert_allclose(alone[0], text_emb[1], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_extracted_equals_binary_masked_and_costs_match(example, seed):
    adapter, params, inputs = example
    spec = adapter.mask_spec()
    keep = random_keep(spec, seed)
    keep["text/mlp"][0] = False  # a text layer without MLP
    keep["image/mlp"][1] = False  # an image layer without MLP
    keep["image/vo"][0] = False  # an image layer without attention
    keep = adapter.normalize_keep(keep)
    small, arch_spec = adapter.extract(params, keep)
    assert arch_spec["image"]["layers"][1]["mlp_dim"] == 0 and arch_spec["text"]["layers"][0]["mlp_dim"] == 0
    masks = {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()}
    for a, b in zip(run(adapter, small, inputs, arch_spec=arch_spec), run(adapter, params, inputs, masks),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
    assert adapter.arch_cost(arch_spec)[0] == count(small)
    assert adapter.arch_cost(adapter.dense_spec())[0] == count(params)


def test_declared_cost_is_counted_cost_for_exact_groups(example):
    _, params, inputs = example
    adapter = ClipAdapter(clip_config("mu"), ("qk", "vo", "mlp"), ("qk", "vo", "mlp"))
    spec = adapter.mask_spec()
    assert all(g.exact_cost for g in spec.groups)
    assert spec.total_params == count(params)
    assert (spec.total_params, spec.total_macs) == pytest.approx(adapter.arch_cost(adapter.dense_spec()))
    keep = adapter.normalize_keep(random_keep(spec, 3, p=0.5))
    small, arch_spec = adapter.extract(params, keep)
    assert spec.kept_cost(keep) == pytest.approx(adapter.arch_cost(arch_spec))
    assert adapter.arch_cost(arch_spec)[0] == count(small)


def test_folded_continuous_masks(example):
    adapter, params, inputs = example
    spec = adapter.mask_spec()
    keep = adapter.normalize_keep(random_keep(spec, 4))
    rng = np.random.default_rng(5)
    masks = {g.name: rng.uniform(0.5, 1.5, g.shape).astype(np.float32) for g in spec.groups}
    small, arch_spec = adapter.extract(params, keep, masks, fold_masks=True)
    want = run(adapter, params, inputs, {k: masks[k] * keep[k] for k in masks})
    for a, b in zip(run(adapter, small, inputs, arch_spec=arch_spec), want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_an_unpruned_tower_stays_dense(example):
    _, params, inputs = example
    adapter = ClipAdapter(clip_config("mu"), (), ("mlp",))
    spec = adapter.mask_spec()
    assert spec.names == ("text/mlp",)
    assert spec.total_params == count(params)
    keep = {"text/mlp": random_keep(spec, 6)["text/mlp"]}
    small, arch_spec = adapter.extract(params, keep)
    jax.tree.map(np.testing.assert_array_equal, small["image"], params["image"])
    assert spec.kept_cost(keep) == pytest.approx(adapter.arch_cost(arch_spec))
    masks = {"text/mlp": jnp.asarray(keep["text/mlp"], jnp.float32)}
    for a, b in zip(run(adapter, small, inputs, arch_spec=arch_spec), run(adapter, params, inputs, masks),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
    with pytest.raises(ConfigError, match="at least one tower"):
        ClipAdapter(clip_config("mu"), (), ())


class _PairTask:
    """The two-tower inputs of a batch (the part of a task the scores read)."""

    def inputs(self, batch):
        return batch["image"], batch["ids"], batch["mask"]


def test_wanda_and_magnitude_scores_have_the_mask_spec_shapes(example):
    adapter, params, (images, ids, mask) = example
    spec = adapter.mask_spec()
    batch = {"image": images, "ids": ids, "mask": mask}
    kw = dict(adapter=adapter, params=params, batches=[batch, batch], task=_PairTask())
    for name in ("wanda", "magnitude"):
        scores = baselines.importance_scores(name, spec, **kw)
        assert {k: v.shape for k, v in scores.items()} == {g.name: g.shape for g in spec.groups}
        assert all(np.isfinite(v).all() and (v > 0).all() for v in scores.values())
    # the image tower's wanda scores are the ViT's own on the same images
    wanda = baselines.importance_scores("wanda", spec, **kw)
    vit = ViTAdapter(adapter.config.image, ALL)
    alone = baselines.importance_scores(
        "wanda", vit.mask_spec(), adapter=vit, params=params["image"], batches=[{"image": images}] * 2
    )
    for kind in ALL:
        np.testing.assert_allclose(wanda[f"image/{kind}"], alone[kind], rtol=1e-5)


def test_configs_round_trip_and_old_vit_specs_load():
    c = clip_config("mu")
    assert ClipConfig.from_json(c.to_json()) == c
    old = {k: v for k, v in c.image.to_json().items() if k not in ("ln_pre", "patch_bias", "activation")}
    legacy = ViTConfig.from_json(old)
    assert (legacy.ln_pre, legacy.patch_bias, legacy.activation) == (False, True, None)
    with pytest.raises(ConfigError, match="feature models"):
        ClipConfig(dataclasses.replace(c.image, num_classes=3), c.text)
    with pytest.raises(ConfigError, match="MLP activation"):
        dataclasses.replace(c.image, activation="swish")
    assert VARIANT_NAMES == VARIANTS
    params = jax.eval_shape(
        TwoTower(c).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 4), jnp.int32)
    )["params"]
    assert "ln_pre" in params["image"] and "bias" not in params["image"]["embedding"]
    assert set(params) == {"image", "text", "image_proj", "text_proj", "logit_scale"}


def test_group_names():
    assert tower_groups(None) == (ALL, ALL)
    assert tower_groups(("qk", "text/mlp")) == (("qk",), ("qk", "mlp"))
    assert tower_groups(("image/vo",)) == (("vo",), ())
    with pytest.raises(ConfigError):
        tower_groups(("audio/qk",))
    with pytest.raises(ConfigError):
        tower_groups(("image/ffn",))


def run_config(init: str, **model):
    import ml_collections

    c = ml_collections.ConfigDict()
    c.seed = 0
    keys = dict(init=init, init_path="", variant="mu", image_size=28, seq_len=16, embed_dim=32)
    groups = dict(image_groups=("qk", "vo", "mlp"), text_groups=("mlp",))
    c.model = ml_collections.ConfigDict({"arch": "clip", **keys, **groups, **model})
    return c


def test_lit_entry_loads_both_pretrained_towers():
    from spp_jax.errors import AssetNotInstalled

    arch, cfg = ClipArchitecture(), run_config("lit")
    try:
        arch.check_init(cfg)
    except AssetNotInstalled as e:
        pytest.skip(str(e))
    adapter = arch.build_adapter(cfg, None)
    c = adapter.config
    assert (c.image.width, c.image.layerscale, c.embed_dim) == (384, True, 32)
    assert (c.text.width, c.text.pool, c.text.seq_len) == (384, "mean", 16)
    params = arch.load_pretrained(cfg, adapter)
    assert count(params) == adapter.arch_cost(adapter.dense_spec())[0] == adapter.mask_spec().total_params
    assert params["image_proj"]["kernel"].std() == pytest.approx(384**-0.5, rel=0.1)
    tok, special = arch.tokenizer(cfg)
    ids = np.asarray([tok.encode("a photo of a bag.").ids], np.int32)
    image_emb, text_emb, scale = run(adapter, params, (jnp.zeros((1, 28, 28, 3)), ids, np.ones_like(ids)))
    assert image_emb.shape == text_emb.shape == (1, 32) and scale == pytest.approx(1 / 0.07, rel=1e-5)


def test_hf_entry_needs_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ClipArchitecture().check_init(run_config("hf", init_path=str(tmp_path / "nope")))
