"""The compute dtype (model.dtype = bfloat16, mixed precision) and the attention core option, on the CPU.

bfloat16 keeps 8 mantissa bits, so its outputs and mask gradients are compared with float32 ones by relative
size and direction, not equality. The fused cuDNN attention itself needs a GPU; here the option must compute
the same function as the einsum path (a model searched on a GPU runs anywhere)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.adapters import ViTAdapter
from spp_jax.adapters.llama import LlamaAdapter
from spp_jax.architectures import architecture_class
from spp_jax.errors import ConfigError
from spp_jax.models.llama import LlamaConfig, llama_config
from spp_jax.models.vit import ViTConfig, vit_config
from spp_jax.search import init_search_state, make_search_step
from spp_jax.spp import spp
from spp_jax.tasks.causal_lm import CausalLM
from spp_jax.tasks.image_classification import ImageClassification

pytestmark = pytest.mark.slow  # bfloat16 and attention kernels of every row: the full suite


def _case(arch: str):
    """(float32 adapter, task, params, batch) of a tiny model with every mask group and perturbed weights
    (zero biases and head would hide dtype mistakes)."""
    rng = np.random.default_rng(0)
    if arch == "vit":
        adapter = ViTAdapter(vit_config("mu", num_classes=5), ("qk", "vo", "mlp", "heads"))
        data = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32), "label": np.array([0, 1, 2, 3])}
        task, example = ImageClassification(), data["image"][:1]
    else:
        adapter = LlamaAdapter(llama_config("mu"), ("qk", "vo", "mlp", "kv_heads"))
        data = {"tokens": rng.integers(0, 256, (2, 13)).astype(np.int32)}
        task, example = CausalLM(), data["tokens"][:1, :8]
    params = adapter.module().init(jax.random.key(0), example)["params"]
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
    return adapter, task, params, data


def _with(adapter, **compute):
    return dataclasses.replace(adapter, config=dataclasses.replace(adapter.config, **compute))


def _bf16(adapter):
    """`adapter` at the bfloat16 compute dtype (both towers of a two-tower model)."""
    c = adapter.config
    if hasattr(c, "image"):
        to16 = lambda tower: dataclasses.replace(tower, dtype="bfloat16")
        return dataclasses.replace(
            adapter, config=dataclasses.replace(c, image=to16(c.image), text=to16(c.text))
        )
    return _with(adapter, dtype="bfloat16")


@pytest.mark.parametrize("arch", ["vit", "llama", "bert", "swin", "clip"])
def test_every_row_computes_in_bfloat16_with_float32_params_and_outputs(arch):
    adapter, params, inputs = architecture_class(arch)().tiny_example(None, 0)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
    bf16 = _bf16(adapter)
    # parameters are created in float32 whatever the compute dtype
    init = jax.eval_shape(bf16.module().init, jax.random.key(0), *inputs)["params"]
    assert {p.dtype for p in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}
    masks = {
        k: (0.5 + rng.random(m.shape)).astype(np.float32) for k, m in adapter.mask_spec().init_masks().items()
    }
    outs = {}
    for name, a in (("f32", adapter), ("bf16", bf16)):
        apply = jax.jit(a.module().apply)
        outs[name] = jax.tree.leaves(apply({"params": params}, *inputs, masks=masks))
    errs = []
    for o32, o16 in zip(outs["f32"], outs["bf16"], strict=True):
        assert o16.dtype == jnp.float32 and o16.shape == o32.shape
        errs.append(float(jnp.abs(o16 - o32).max() / jnp.abs(o32).max()))
    # bfloat16 did run (not float32), and close to it (CLIP's logit scale is a parameter: equal)
    assert 0 < max(errs) < 0.05, errs


@pytest.mark.parametrize("arch", ["vit", "llama"])
def test_bfloat16_search_step_keeps_the_spp_state_float32(arch):
    adapter, task, params, data = _case(arch)
    bf16 = _with(adapter, dtype="bfloat16")
    spec, tx = adapter.mask_spec(), spp("official", learning_rate=0.05, lam=0.9)
    states = {}
    for name, a in (("f32", adapter), ("bf16", bf16)):
        step = jax.jit(make_search_step(a.module().apply, spec, tx, task=task))
        state = init_search_state(spec, tx)
        for _ in range(3):
            state, _ = step(state, params, data)
        states[name] = state
    for tree in (states["bf16"].masks, states["bf16"].opt_state.z):
        assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
    for k, m32 in states["f32"].masks.items():
        # Adam turns tiny gradients into +-lr steps, so compare the directions the masks moved in
        a, b = np.asarray(m32).ravel() - 1.0, np.asarray(states["bf16"].masks[k]).ravel() - 1.0
        assert np.all(np.isfinite(b)) and np.linalg.norm(a) > 0
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.95, k


@pytest.mark.parametrize("arch", ["vit", "llama"])
def test_cudnn_attention_off_gpu_is_the_einsum_path(arch):
    assert jax.default_backend() != "gpu"
    adapter, _, params, data = _case(arch)
    x = data["image"] if arch == "vit" else data["tokens"][:, :-1]
    xla = _with(adapter, dtype="bfloat16").module().apply({"params": params}, x)
    cudnn = _with(adapter, dtype="bfloat16", attention="cudnn").module().apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(xla), np.asarray(cudnn))


@pytest.mark.parametrize("make", [lambda **k: ViTConfig(**k), lambda **k: llama_config("mu", **k)])
def test_compute_options_are_checked(make):
    for kw, message in (
        ({"dtype": "float16"}, "dtype='float16' is not a compute dtype"),
        ({"attention": "flash"}, "attention='flash' is not an attention core"),
        ({"attention": "cudnn"}, "runs in bfloat16 only"),
    ):
        with pytest.raises(ConfigError, match=message):
            make(**kw)


def test_arch_specs_saved_before_the_compute_keys_still_load():
    for config, cls in ((vit_config("mu"), ViTConfig), (llama_config("mu"), LlamaConfig)):
        old = {k: v for k, v in config.to_json().items() if k not in ("dtype", "attention")}
        assert cls.from_json(old) == config and config.dtype == "float32"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [7, 8])
def test_fused_attention_padding_of_odd_lengths_is_exact(causal, t):
    """The odd-length padding of `fused_attention` (one zero query row sliced off, one zero key hidden by
    the padding mask) run through XLA's kernel: outputs and input gradients equal the unpadded attention."""
    from spp_jax.models.vit import fused_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32) for _ in range(2))  # grouped queries
    w = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=0.3, is_causal=causal, implementation="xla")

    def padded(q, k, v):
        return fused_attention(q, k, v, 0.3, is_causal=causal, implementation="xla")

    out_a, out_b = plain(q, k, v), padded(q, k, v)
    assert out_b.shape == out_a.shape
    np.testing.assert_allclose(out_b, out_a, rtol=1e-5, atol=1e-6)
    ga = jax.grad(lambda *x: jnp.sum(plain(*x) * w), argnums=(0, 1, 2))(q, k, v)
    gb = jax.grad(lambda *x: jnp.sum(padded(*x) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ga, gb, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_a_saved_cudnn_run_config_loads_off_gpu():
    """A workdir searched on a GPU with the fused kernel is reused here (extract, fine-tune, evaluate) with
    the einsum core; a new run that asks for the kernel on a CPU is refused."""
    from configs.vit import get_config
    from spp_jax.run_config import for_this_backend, validate_config

    cfg = get_config("mu")
    cfg.model.dtype, cfg.model.attention = "bfloat16", "cudnn"
    with pytest.raises(ConfigError, match=r"model\.attention=cudnn needs a GPU"):
        validate_config(cfg)
    validate_config(for_this_backend(cfg))
    assert (cfg.model.dtype, cfg.model.attention) == ("bfloat16", "xla")
