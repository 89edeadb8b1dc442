"""Masked transformer primitives shared by the models (ViT, BERT, Swin, Llama, CLIP's towers).

`LayerDims` are one block's inner dims (algorithm.md §5); `MaskedAttention` and `MaskedMlp` are the ViT-layout
attention and MLP with the qk/vo/heads and mlp masks (algorithm.md §2); `mask_mul` multiplies a mask in and
`sow_mask_input` records what it multiplies for the wanda baseline (spp_jax.baselines); `attention_core` and
`fused_attention` are the attention cores (einsum or the fused cuDNN kernel, spp_jax.compute); `Bias` is what
is left of a branch pruned to nothing; `DropPath` is stochastic depth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spp_jax.errors import ConfigError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerDims:
    """Inner dims of one transformer block; any of them may be 0 (the branch then reduces to its bias)."""

    num_heads: int
    qk_dim: int
    v_dim: int
    mlp_dim: int


def layers_to_json(layers: Sequence[LayerDims]) -> list[dict[str, int]]:
    """Per-layer dims as an arch spec's "layers" list (algorithm.md §5)."""
    return [dataclasses.asdict(d) for d in layers]


def layers_from_json(d: Sequence[Mapping[str, int]]) -> tuple[LayerDims, ...]:
    """The per-layer dims of an arch spec's "layers" list (`layers_to_json`'s inverse)."""
    return tuple(LayerDims(**x) for x in d)


def attention_core(q: Array, k: Array, v: Array, head_dim: int, bias: Array | None = None,
                   impl: str = "xla") -> Array:  # fmt: skip
    """softmax(q k^T / sqrt(head_dim) + bias) v for q, k [B, T, heads, dqk] and v [B, T, heads, dv]; the
    logits and the softmax in float32. `bias` broadcasts to [B, heads, T, T]. impl "cudnn" is
    `fused_attention` where it runs: on a GPU, no bias, dqk == dv (elsewhere the einsum path computes the
    same function, so a model searched on a GPU runs anywhere)."""
    if impl == "cudnn" and bias is None and q.shape[-1] == v.shape[-1] and jax.default_backend() == "gpu":
        return fused_attention(q, k, v, 1.0 / math.sqrt(head_dim))
    f32 = jnp.float32
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=f32) / math.sqrt(head_dim)
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def fused_attention(q: Array, k: Array, v: Array, scale: float, is_causal: bool = False,
                    implementation: str = "cudnn") -> Array:  # fmt: skip
    """`jax.nn.dot_product_attention`'s cuDNN kernel on [B, T, heads, dim] inputs (k/v may have fewer heads).
    Its backward pass takes even lengths only, so an odd T gets one zero query row (sliced off) and one zero
    key that the kernel's padding mask hides (`key_value_seq_lengths`): every query attends to its keys.
    (`implementation="xla"` runs the same padding through XLA's kernel, for tests on a CPU.)"""
    t = q.shape[1]
    if t % 2 == 0:
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=is_causal, implementation=implementation
        )
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0)))
    lengths = jnp.full((q.shape[0],), t, jnp.int32)
    out = jax.nn.dot_product_attention(
        pad(q), pad(k), pad(v), scale=scale, is_causal=is_causal, query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation=implementation,
    )  # fmt: skip
    return out[:, :t]


class Bias(nn.Module):
    """What is left of a branch whose inner dim was pruned to 0: its output bias."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return jnp.broadcast_to(bias.astype(x.dtype), x.shape)


def sow_mask_input(module: nn.Module, group: str, x: Array, axis: int = -1) -> None:
    """Record the per-entry sum of squares of `x`, the activation mask `group` multiplies (entries on `axis`),
    in the "mask_inputs" collection (spp_jax.baselines.MASK_INPUTS, read by the wanda score). Only when the
    caller made that collection mutable: ordinary applies (and init) compute and return nothing extra."""
    if module.is_mutable_collection("mask_inputs") and not module.is_initializing():
        axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
        module.sow("mask_inputs", group, jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes))


def mask_mul(x: Array, mask: Array) -> Array:
    """x * mask (mask [..., size] on x's trailing axis), broadcast explicitly to x's shape, so that the mask's
    cotangent sums over every leading axis of x, a size-1 one included. The per-example gradients of the
    curvature search (a vmap over batches of one) otherwise leave that axis in a [B, 1, size] reduction
    XLA:CPU runs ~30x slower. The product is in x's dtype (the mask's gradient comes back as float32)."""
    return x * jnp.broadcast_to(mask.astype(x.dtype), x.shape)


def flat_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for a DenseGeneral contraction (trailing axes of `lhs` with leading axes of the
    kernel, no batch axes) as one 2-D matmul: XLA:CPU copies a multi-axis kernel (transposed) for the
    backward pass's dot at every step, a 2-D one it reads in place."""
    (lc, rc), (lb, rb) = dimension_numbers
    n = len(lc)
    if lb or rb or tuple(rc) != tuple(range(n)) or tuple(lc) != tuple(range(lhs.ndim - n, lhs.ndim)):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    k = math.prod(rhs.shape[:n])
    out = jnp.matmul(lhs.reshape(-1, k), rhs.reshape(k, -1), precision=precision,
                     preferred_element_type=preferred_element_type)  # fmt: skip
    return out.reshape(*lhs.shape[: lhs.ndim - n], *rhs.shape[n:])


class MaskedAttention(nn.Module):
    """Multi-head self-attention with qk/vo/heads masks; scale stays 1/sqrt(head_dim) (algorithm.md §5).

    `bias` (optional) is added to the attention logits, broadcastable to [B, H, Q, K]: a large negative value
    removes a key (padding, causal order). With every qk dim removed the logits are just `bias`, so the
    uniform attention then runs over the keys it allows, as the binary-masked dense model does.
    `dtype` is the compute dtype, `attention` the core's implementation (`attention_core`)."""

    dims: LayerDims
    width: int
    head_dim: int
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: Array, masks: Mapping[str, Array], bias: Array | None = None) -> Array:
        h, dqk, dv = self.dims.num_heads, self.dims.qk_dim, self.dims.v_dim
        if h * dv == 0:  # every value dim (or head) removed: the branch outputs W_o's bias only.
            return Bias(self.width, name="out")(x)
        dense = lambda feats, name: nn.DenseGeneral(
            feats, name=name, dot_general=flat_dot_general, dtype=self.dtype
        )
        v = dense((h, dv), "value")(x)
        if "vo" in masks:
            sow_mask_input(self, "vo", v)
            v = mask_mul(v, masks["vo"])
        if dqk > 0:
            q = dense((h, dqk), "query")(x)
            k = dense((h, dqk), "key")(x)
            if "qk" in masks:
                sow_mask_input(self, "qk", q)
                sow_mask_input(self, "qk", k)
                q, k = mask_mul(q, masks["qk"]), mask_mul(k, masks["qk"])
            out = attention_core(q, k, v, self.head_dim, bias, self.attention)
        elif bias is not None:  # all qk dims removed: logits are `bias` alone.
            b, n = x.shape[0], x.shape[-2]
            weights = jax.nn.softmax(jnp.broadcast_to(bias, (b, h, n, n)), axis=-1).astype(v.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        else:  # all qk dims removed: logits are 0, attention is uniform over keys.
            out = jnp.broadcast_to(v.mean(axis=1, keepdims=True), v.shape)
        if "heads" in masks:
            sow_mask_input(self, "heads", out, axis=-2)
            out = mask_mul(out, masks["heads"][:, None])
        out_proj = nn.DenseGeneral(
            self.width, axis=(-2, -1), name="out", dot_general=flat_dot_general, dtype=self.dtype
        )
        return out_proj(out)


class MaskedMlp(nn.Module):
    """Two-layer MLP with a mask on the hidden neurons (before the activation by default); the masked
    activation is sown for wanda under `group` (the mask group's name).

    `activation`: None = GELU (tanh approximation iff `gelu_approximate`), "gelu" (exact erf), "gelu_tanh",
    "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP) or "relu"."""

    mlp_dim: int
    width: int
    mask_pre_act: bool = True
    gelu_approximate: bool = False
    group: str = "mlp"
    activation: str | None = None
    dtype: Any = jnp.float32

    def act(self, y: Array) -> Array:
        name = self.activation or ("gelu_tanh" if self.gelu_approximate else "gelu")
        if name == "gelu":  # exact GELU in its erf form (as PyTorch): erfc (nn.gelu's) costs ~1.6x on CPU
            return 0.5 * y * (1.0 + jax.lax.erf(y * (1.0 / math.sqrt(2.0))))
        if name == "gelu_tanh":
            return nn.gelu(y, approximate=True)
        if name == "quick_gelu":
            return y * jax.nn.sigmoid(1.702 * y)
        if name == "relu":
            return jax.nn.relu(y)
        raise ConfigError(
            f"MLP activation {name!r} is unknown; use 'gelu', 'gelu_tanh', 'quick_gelu' or 'relu'"
        )

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        if self.mlp_dim == 0:
            return Bias(self.width, name="fc2")(x)
        y = nn.Dense(self.mlp_dim, name="fc1", dtype=self.dtype)(x)
        if mask is not None and self.mask_pre_act:
            sow_mask_input(self, self.group, y)
            y = mask_mul(y, mask)
        y = self.act(y)
        if mask is not None and not self.mask_pre_act:
            sow_mask_input(self, self.group, y)
            y = mask_mul(y, mask)
        return nn.Dense(self.width, name="fc2", dtype=self.dtype)(y)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per example."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, 0.0)
