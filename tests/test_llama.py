"""The Llama decoder row: masks, extraction, costs, RoPE pair pruning, KV-cache generation, save/load, and
the logits of transformers' LlamaForCausalLM, all on the tiny "mu" variant with random weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax import baselines, checkpoint
from spp_jax.adapters import LlamaAdapter, adapter_from_spec
from spp_jax.errors import ConfigError
from spp_jax.generation import decode_tokens_per_second, generate
from spp_jax.models.llama import Llama, LlamaConfig, init_cache, layers_from_json, llama_config

ALL = ("qk", "vo", "mlp", "kv_heads")


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def model():
    """(config, params, tokens): random mu weights, perturbed so that unit norm scales hide nothing."""
    config = llama_config("mu")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    params = jax.jit(Llama(config).init)(jax.random.key(0), tokens[:1])["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [np.asarray(p + 0.1 * jax.random.normal(k, p.shape)) for p, k in zip(leaves, keys, strict=True)]
    return config, jax.tree.unflatten(tree, leaves), tokens


def _apply(adapter, params, tokens, masks=None, arch_spec=None) -> np.ndarray:
    return np.asarray(adapter.module(arch_spec).apply({"params": params}, jnp.asarray(tokens), masks=masks))


def _keep(adapter, seed: int) -> dict[str, np.ndarray]:
    """A random keep-set in which layer 0 loses every value dim and layer 1 every MLP neuron."""
    rng = np.random.default_rng(seed)
    keep = {g.name: rng.random(g.shape) < 0.6 for g in adapter.mask_spec().groups}
    keep["vo"][0] = False
    keep["mlp"][1] = False
    if "kv_heads" in keep:
        keep["kv_heads"][1, 0] = False
    return keep


def test_config_variants_and_json():
    c = llama_config("smollm2-135m")
    assert (c.depth, c.width, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim) == (30, 576, 9, 3, 64, 1536)
    assert c.tie_embeddings and c.rope_theta == 1e5 and c.vocab_size == 49152 and c.max_len == 8192
    assert not llama_config("llama3-8b").tie_embeddings and llama_config("llama3-8b").num_kv_heads == 8
    assert LlamaConfig.from_json(c.to_json()) == c
    with pytest.raises(ConfigError, match="unknown Llama variant"):
        llama_config("gpt2")
    with pytest.raises(ConfigError, match="num_kv_heads"):
        llama_config("mu", num_kv_heads=3)


def test_all_ones_masks_give_dense(model):
    config, params, tokens = model
    adapter = LlamaAdapter(config, ALL)
    dense = _apply(adapter, params, tokens)
    assert dense.shape == (2, 12, config.vocab_size) and dense.dtype == np.float32
    np.testing.assert_array_equal(_apply(adapter, params, tokens, adapter.mask_spec().init_masks()), dense)


def test_causal(model):
    config, params, tokens = model
    adapter = LlamaAdapter(config)
    full, prefix = _apply(adapter, params, tokens), _apply(adapter, params, tokens[:, :5])
    np.testing.assert_allclose(full[:, :5], prefix, atol=1e-5)


@pytest.mark.parametrize(
    "groups,fold", [(("qk", "vo", "mlp"), False), (("qk", "vo", "mlp"), True), (ALL, False), (ALL, True)]
)
def test_extracted_equals_masked_and_costs_match(model, groups, fold):
    config, params, tokens = model
    adapter = LlamaAdapter(config, groups)
    spec = adapter.mask_spec()
    keep = adapter.normalize_keep(_keep(adapter, seed=len(groups) + fold))
    assert not keep["qk"][0].any()  # no value dim left: the layer's qk entries are dead
    rng = np.random.default_rng(7)
    values = {g.name: rng.uniform(0.5, 1.5, g.shape).astype(np.float32) for g in spec.groups}
    small, arch_spec = adapter.extract(params, keep, values, fold_masks=fold)
    masks = {k: v * (values[k] if fold else 1.0) for k, v in keep.items()}
    np.testing.assert_allclose(
        _apply(adapter, small, tokens, arch_spec=arch_spec),
        _apply(adapter, params, tokens, {k: jnp.asarray(v, jnp.float32) for k, v in masks.items()}),
        atol=1e-5,
        rtol=1e-5,
    )
    assert "attn" not in small["block_0"] and "mlp" not in small["block_1"]
    n_params, macs = adapter.arch_cost(arch_spec)
    assert n_params == _count(small)
    if all(g.exact_cost for g in spec.groups):
        assert spec.kept_cost(keep) == pytest.approx((n_params, macs), rel=1e-12)
    else:  # overlapping groups: the declared cost is an upper bound
        assert all(d >= a - 1e-6 for d, a in zip(spec.kept_cost(keep), (n_params, macs), strict=True))


@pytest.mark.parametrize("groups", [("qk", "vo", "mlp"), ("kv_heads", "mlp"), ("vo",)])
def test_dense_costs(model, groups):
    config, params, _ = model
    adapter = LlamaAdapter(config, groups)
    spec = adapter.mask_spec()
    n_params, macs = adapter.arch_cost(adapter.dense_spec())
    assert n_params == _count(params) == pytest.approx(spec.total_params)
    assert macs == pytest.approx(spec.total_macs)
    assert spec.kept_cost(spec.full_keep()) == pytest.approx((n_params, macs))


def test_llama2_7b_param_count_from_shapes():
    adapter = LlamaAdapter(llama_config("llama2-7b"))
    shapes = jax.eval_shape(adapter.module().init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    assert adapter.arch_cost(adapter.dense_spec())[0] == _count(shapes["params"])
    assert adapter.mask_spec().total_params == _count(shapes["params"])


def test_rope_pair_pruning_keeps_frequencies(model):
    config, params, tokens = model
    adapter = LlamaAdapter(config)
    keep = adapter.mask_spec().full_keep()
    keep["qk"][:] = False
    keep["qk"][:, [1, 3]] = True
    small, arch_spec = adapter.extract(params, keep)
    assert [ly["rope_pairs"] for ly in arch_spec["layers"]] == [[1, 3]] * config.depth
    assert small["block_0"]["attn"]["query"]["kernel"].shape == (config.width, config.num_heads, 4)
    masked = _apply(adapter, params, tokens, {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()})
    np.testing.assert_allclose(_apply(adapter, small, tokens, arch_spec=arch_spec), masked, atol=1e-5)
    wrong = dict(arch_spec, layers=[dict(ly, rope_pairs=[0, 1]) for ly in arch_spec["layers"]])
    assert np.abs(_apply(adapter, small, tokens, arch_spec=wrong) - masked).max() > 1e-3


def test_save_load_round_trip(model, tmp_path):
    config, params, tokens = model
    adapter = LlamaAdapter(config, ALL)
    small, arch_spec = adapter.extract(params, adapter.normalize_keep(_keep(adapter, 3)))
    checkpoint.save_model(tmp_path / "m", small, arch_spec)
    module, loaded, spec_back = checkpoint.load_pruned(tmp_path / "m")
    assert spec_back == arch_spec and isinstance(adapter_from_spec(spec_back), LlamaAdapter)
    np.testing.assert_array_equal(
        np.asarray(module.apply({"params": loaded}, jnp.asarray(tokens))),
        _apply(adapter, small, tokens, arch_spec=arch_spec),
    )


def _greedy_by_recomputation(module, params, prompt: np.ndarray, n: int) -> np.ndarray:
    """Greedy decoding by a full forward per token (on a zero-padded buffer: causal, so the padding after
    position t does not change the logits at t; one compilation)."""
    b, p = prompt.shape
    ids = np.concatenate([prompt, np.zeros((b, n), np.int32)], axis=1)
    forward = jax.jit(lambda x: module.apply({"params": params}, x))
    for t in range(p, p + n):
        ids[:, t] = np.asarray(forward(jnp.asarray(ids)))[:, t - 1].argmax(-1)
    return ids


@pytest.mark.parametrize("pruned", [False, True])
def test_kv_cache_generation_equals_recomputation(model, pruned):
    config, params, tokens = model
    adapter = LlamaAdapter(config, ALL)
    arch_spec = None
    if pruned:
        params, arch_spec = adapter.extract(params, adapter.normalize_keep(_keep(adapter, 4)))
    module = adapter.module(arch_spec)
    prompt = tokens[:, :5]
    out = generate(module, params, prompt, 7)
    assert out.shape == (2, 12) and out.dtype == np.int32
    np.testing.assert_array_equal(out, _greedy_by_recomputation(module, params, prompt, 7))
    # chunked cached forward == full forward
    layers = None if arch_spec is None else layers_from_json(arch_spec["layers"])
    run = jax.jit(lambda x, cache: module.apply({"params": params}, x, cache=cache))
    cache = init_cache(config, layers, 2, 32)
    a, cache = run(jnp.asarray(tokens[:, :7]), cache)
    b, cache = run(jnp.asarray(tokens[:, 7:]), cache)
    assert int(cache["length"]) == 12
    full = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), full, atol=1e-5)


def test_sampling_eos_and_throughput(model):
    config, params, tokens = model
    module = Llama(config)
    prompt = tokens[:, :4]
    s1 = generate(module, params, prompt, 6, temperature=1.0, seed=3)
    np.testing.assert_array_equal(s1, generate(module, params, prompt, 6, temperature=1.0, seed=3))
    greedy = generate(module, params, prompt, 6)
    eos = int(greedy[0, 5])  # the second generated token of row 0
    out = generate(module, params, prompt, 6, eos_id=eos)
    assert (out[0, 5:] == eos).all() and out.shape == greedy.shape
    with pytest.raises(ConfigError, match="max_len"):
        generate(module, params, prompt, config.max_len)
    assert decode_tokens_per_second(module, params, prompt_len=4, new_tokens=3, repeats=1) > 0


def test_mask_inputs_are_sown_and_wanda_runs(model):
    config, params, tokens = model
    adapter = LlamaAdapter(config, ALL)
    spec = adapter.mask_spec()
    _, state = adapter.module().apply(
        {"params": params}, jnp.asarray(tokens), masks=spec.init_masks(), mutable=[baselines.MASK_INPUTS]
    )
    sown = state[baselines.MASK_INPUTS]
    hd = config.head_dim
    for i in range(config.depth):
        attn, mlp = sown[f"block_{i}"]["attn"], sown[f"block_{i}"]["mlp"]
        assert [x.shape for x in attn["qk"]] == [(hd // 2,), (hd // 2,)]  # q and k
        assert [x.shape for x in attn["vo"]] == [(hd,)]
        assert [x.shape for x in attn["kv_heads"]] == [(config.num_kv_heads,)]
        assert [x.shape for x in mlp["mlp"]] == [(config.mlp_dim,)]
    # no collection unless asked
    assert not isinstance(adapter.module().apply({"params": params}, jnp.asarray(tokens)), tuple)

    @dataclasses.dataclass
    class Tokens:  # the one method of a task that mask_input_norms needs
        def inputs(self, batch):
            return (batch["tokens"],)

    batches = [{"tokens": jnp.asarray(tokens)}]
    scores = baselines.importance_scores(
        "wanda", spec, adapter=adapter, params=params, batches=batches, task=Tokens()
    )
    assert {k: v.shape for k, v in scores.items()} == {g.name: g.shape for g in spec.groups}
    assert all(np.isfinite(v).all() and (v > 0).all() for v in scores.values())
    mags = adapter.entry_weight_norms(params)
    assert {k: v.shape for k, v in mags.items()} == {g.name: g.shape for g in spec.groups}
    down = np.asarray(params["block_1"]["mlp"]["down"]["kernel"])
    np.testing.assert_allclose(
        adapter.entry_out_weight_norms(params)["mlp"][1], np.linalg.norm(down, axis=1), rtol=1e-6
    )


def _torch_weights_into_ours(model, config: LlamaConfig) -> dict:
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    d, h, kv, hd = config.width, config.num_heads, config.num_kv_heads, config.head_dim
    params: dict = {"embed": {"embedding": sd["model.embed_tokens.weight"]}}
    for i in range(config.depth):
        w = lambda name, i=i: sd[f"model.layers.{i}.{name}.weight"]
        params[f"block_{i}"] = {
            "attn_norm": {"scale": w("input_layernorm")},
            "mlp_norm": {"scale": w("post_attention_layernorm")},
            "attn": {
                "query": {"kernel": w("self_attn.q_proj").T.reshape(d, h, hd)},
                "key": {"kernel": w("self_attn.k_proj").T.reshape(d, kv, hd)},
                "value": {"kernel": w("self_attn.v_proj").T.reshape(d, kv, hd)},
                "out": {"kernel": w("self_attn.o_proj").T.reshape(h, hd, d)},
            },
            "mlp": {k: {"kernel": w(f"mlp.{k}_proj").T} for k in ("gate", "up", "down")},
        }
    params["final_norm"] = {"scale": sd["model.norm.weight"]}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    return params


@pytest.mark.parametrize("tied", [True, False])
def test_matches_transformers_llama(tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = llama_config("mu", tie_embeddings=tied, rope_theta=500.0)
    tcfg = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.depth, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_eps, tie_word_embeddings=tied, max_position_embeddings=64,
        initializer_range=0.08,
    )  # fmt: skip
    torch.manual_seed(0)
    tmodel = transformers.LlamaForCausalLM(tcfg).eval().float()
    with torch.no_grad():
        for name, p in tmodel.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        want = tmodel(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    params = _torch_weights_into_ours(tmodel, config)
    got = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
