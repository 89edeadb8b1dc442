"""Llama-style decoder (Llama 2/3, SmolLM2) in Flax Linen that takes a mask pytree, with a KV-cache path.

Block (pre-norm, no biases): x += Attn(RMSNorm(x)), then x += Mlp(RMSNorm(x)); final RMSNorm, then the LM
head (tied: logits = x @ embed^T). RMSNorm(x) = x * rsqrt(mean(x^2) + eps) * scale, in float32.
SwiGLU MLP: down(silu(gate(x)) * up(x)). Grouped-query attention: query head h reads kv head h // G,
G = num_heads / num_kv_heads. RoPE in the Hugging Face "rotate-half" layout: dims j and j + hd/2 of a head
form rotation pair j with inv_freq_j = theta^(-2j/hd). The attention scale is always the DENSE
1/sqrt(head_dim), so a pruned model equals the binary-masked dense one.

Masks (a dict of [depth, size] arrays; None or all-ones masks give the dense function exactly):
    qk       [depth, hd/2]: entry j scales q and k dims j and j + hd/2 (one RoPE pair) of every query and
             kv head. Scaling a whole pair commutes with its rotation, so no half-pair is ever masked.
    vo       [depth, hd]:   entry j scales value dim j of every kv head (= rows j of W_o of every head)
    mlp      [depth, F]:    entry j scales silu(gate_j) * up_j before `down`
    kv_heads [depth, KV]:   entry g scales the attention output of the G query heads of kv group g
Each mask point sows the per-entry sum of squares of what it multiplies into "mask_inputs" (the wanda
baseline), only when that collection is mutable.

Pruned models: each block has its own `LayerDims`. A kept qk pair keeps its own frequency, so the dims store
the kept pair indices (`rope_pairs`); a pruned q/k head holds [first halves of the kept pairs, second
halves], so rotate-half on the 2p kept dims still pairs dim i with i + p, rotated at pair rope_pairs[i]'s
frequency. A block whose attention has no value dim (or no kv head) left has no attention weights, one with
no MLP neuron left has no MLP weights; their norms stay (the base cost counts them).

Compute dtype (`LlamaConfig.dtype`, "float32" or "bfloat16"): as in spp_jax/models/vit.py, parameters and
masks stay float32; the matmuls and the residual stream run in the compute dtype; RMSNorm, RoPE angles,
attention logits and softmax, and the LM head's accumulation are float32. `LlamaConfig.attention = "cudnn"`
runs causal attention without a cache as `jax.nn.dot_product_attention`'s fused cuDNN kernel (GPU,
bfloat16) where a block's qk and v dims are equal (elsewhere, and off GPUs, the einsum path: the same
function).

KV cache (`init_cache`): {"length": int32 [], "layers": [{"k": [B, T_max, KV_i, qk_i], "v": [B, T_max,
KV_i, v_i]} per block]}, k stored after RoPE and masks. `module.apply(v, tokens, cache=cache)` writes the
new tokens' k/v at positions length .. length + T - 1 (the same for every row: prompts are not padded),
attends causally over the buffer and returns (logits, cache with length + T). `positions` (int [T]) only
overrides the RoPE positions (default length + arange(T)).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.compute import check_compute
from spp_jax.errors import ConfigError
from spp_jax.models.layers import fused_attention, mask_mul, sow_mask_input

Array = jax.Array
Cache = dict[str, Any]
_SIZES = ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")


@dataclasses.dataclass(frozen=True)
class LayerDims:
    """Inner dims of one decoder block. num_heads = num_kv_heads * G (0 with the attention branch gone);
    rope_pairs: the RoPE pair of each kept q/k column pair, in column order (ascending after an extraction,
    in rank order in a weight family), qk_dim = 2 * len(rope_pairs)."""

    num_heads: int
    num_kv_heads: int
    rope_pairs: tuple[int, ...]
    v_dim: int
    mlp_dim: int

    @property
    def qk_dim(self) -> int:
        return 2 * len(self.rope_pairs)

    @property
    def has_attention(self) -> bool:
        return self.num_kv_heads * self.v_dim > 0

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rope_pairs": [int(p) for p in self.rope_pairs]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LayerDims:
        return cls(**{**d, "rope_pairs": tuple(int(p) for p in d["rope_pairs"])})


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a dense Llama-style decoder.

    Attributes:
      vocab_size, width (D), depth, num_heads (H), num_kv_heads (KV), head_dim (hd, even), mlp_dim (F).
      rms_eps: RMSNorm epsilon. rope_theta: RoPE base. tie_embeddings: the LM head is embed^T.
      max_len: the longest context the model is used at (generation refuses longer).
      cost_seq_len: context length N at which MACs per token are counted (spp_jax.adapters.llama).
      dtype: compute dtype, "float32" or "bfloat16" (module docstring); parameters stay float32.
      attention: attention core without a cache, "xla" (einsum + softmax) or "cudnn" (fused, GPU).
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    max_len: int = 2048
    cost_seq_len: int = 256
    dtype: str = "float32"
    attention: str = "xla"

    def __post_init__(self):
        check_compute(self.dtype, self.attention)
        bad = [k for k in _SIZES if not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
        if bad:
            raise ConfigError(f"Llama config sizes {bad} must be positive integers")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}; "
                "grouped-query attention needs whole groups"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} is odd; RoPE rotates pairs of dims")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def dense_layers(self) -> tuple[LayerDims, ...]:
        pairs = tuple(range(self.head_dim // 2))
        d = LayerDims(self.num_heads, self.num_kv_heads, pairs, self.head_dim, self.mlp_dim)
        return (d,) * self.depth

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LlamaConfig:
        return cls(**d)


VARIANTS: dict[str, dict[str, Any]] = {
    "mu": dict(zip(_SIZES, (256, 64, 2, 4, 2, 16, 96), strict=True)),  # tiny, for tests
    "smollm2-135m": dict(
        zip(_SIZES, (49152, 576, 30, 9, 3, 64, 1536), strict=True), rope_theta=1e5, max_len=8192
    ),
    "llama2-7b": dict(
        zip(_SIZES, (32000, 4096, 32, 32, 32, 128, 11008), strict=True),
        rope_theta=1e4,
        tie_embeddings=False,
        max_len=4096,
    ),
    "llama3-8b": dict(
        zip(_SIZES, (128256, 4096, 32, 32, 8, 128, 14336), strict=True),
        rope_theta=5e5,
        tie_embeddings=False,
        max_len=8192,
    ),
}


def llama_config(variant: str, **overrides: Any) -> LlamaConfig:
    """The config of a named variant ("mu", "smollm2-135m", "llama2-7b", "llama3-8b") with overrides."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown Llama variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return LlamaConfig(**{**VARIANTS[variant], **overrides})


def layers_to_json(layers: Sequence[LayerDims]) -> list[dict[str, Any]]:
    return [d.to_json() for d in layers]


def layers_from_json(d: Sequence[Mapping[str, Any]]) -> tuple[LayerDims, ...]:
    return tuple(LayerDims.from_json(x) for x in d)


def rope_inv_freq(pairs: Sequence[int], head_dim: int, theta: float) -> np.ndarray:
    """inv_freq of the given pair indices, theta^(-2j/hd), in float32 as Hugging Face computes it."""
    j = np.asarray(pairs, np.float32)
    return (1.0 / np.float32(theta) ** (2.0 * j / np.float32(head_dim))).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate-half RoPE of x [B, T, heads, 2p] at positions [T]: dim i pairs with dim i + p."""
    p = len(inv_freq)
    if p == 0:
        return x
    angle = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, p]
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    x1, x2 = x[..., :p], x[..., p:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def init_cache(
    config: LlamaConfig,
    layers: Sequence[LayerDims] | None,
    batch: int,
    max_len: int,
    dtype: Any = jnp.float32,
) -> Cache:
    """An empty KV cache (module docstring) for `batch` sequences of up to `max_len` tokens."""
    layers = config.dense_layers() if layers is None else layers
    out = []
    for d in layers:
        kv = d.num_kv_heads if d.has_attention else 0
        out.append(
            {
                "k": jnp.zeros((batch, max_len, kv, d.qk_dim if kv else 0), dtype),
                "v": jnp.zeros((batch, max_len, kv, d.v_dim if kv else 0), dtype),
            }
        )
    return {"length": jnp.zeros((), jnp.int32), "layers": out}


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE and qk/vo/kv_heads masks (module docstring)."""

    config: LlamaConfig
    dims: LayerDims

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        masks: Mapping[str, Array],
        cache: Cache | None = None,
        index: Array | int = 0,
    ) -> tuple[Array, Cache | None]:
        """x [B, T, D] at RoPE `positions` [T]; with `cache` ({"k", "v"} buffers of this block), the new
        k/v go to buffer slots index .. index + T - 1 and the queries attend to every slot up to theirs."""
        c, d = self.config, self.dims
        b, t, _ = x.shape
        kv, g, p = d.num_kv_heads, c.group_size, len(d.rope_pairs)
        dt = jnp.dtype(c.dtype)
        dense = lambda feats, name: nn.DenseGeneral(feats, use_bias=False, name=name, dtype=dt)
        v = dense((kv, d.v_dim), "value")(x)
        if "vo" in masks:
            sow_mask_input(self, "vo", v)
            v = mask_mul(v, masks["vo"])
        if p:
            inv_freq = rope_inv_freq(d.rope_pairs, c.head_dim, c.rope_theta)
            q = apply_rope(dense((d.num_heads, 2 * p), "query")(x), positions, inv_freq)
            k = apply_rope(dense((kv, 2 * p), "key")(x), positions, inv_freq)
            if "qk" in masks:
                pair = lambda a: a.reshape(*a.shape[:-1], 2, p)  # entry j = dims j and j + p
                sow_mask_input(self, "qk", pair(q))
                sow_mask_input(self, "qk", pair(k))
                m = jnp.concatenate([masks["qk"], masks["qk"]])
                q, k = mask_mul(q, m), mask_mul(k, m)
        else:  # every pair removed: all logits are 0, attention is uniform over the causal prefix
            q = jnp.zeros((b, t, d.num_heads, 0), v.dtype)
            k = jnp.zeros((b, t, kv, 0), v.dtype)
        slots = jnp.arange(t)  # buffer slots of the new tokens
        if cache is None:
            keys, values = k, v
        else:
            slots = slots + index
            start = (0, index, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": keys, "v": values}
        if c.attention == "cudnn" and cache is None and 2 * p == d.v_dim and jax.default_backend() == "gpu":
            out = fused_attention(q, k, v, 1.0 / math.sqrt(c.head_dim), is_causal=True)
            out = out.reshape(b, t, kv, g, d.v_dim)
        else:
            q = q.reshape(b, t, kv, g, q.shape[-1])
            logits = jnp.einsum(
                "btkgd,bskd->bkgts", q, keys.astype(q.dtype), preferred_element_type=jnp.float32
            ) / math.sqrt(c.head_dim)
            # causal; unwritten cache slots lie after every query
            allowed = jnp.arange(keys.shape[1])[None, :] <= slots[:, None]  # [T, S]
            logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
            weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            out = jnp.einsum("bkgts,bskd->btkgd", weights, values.astype(v.dtype))  # [B, T, KV, G, dv]
        if "kv_heads" in masks:
            sow_mask_input(self, "kv_heads", out, axis=2)
            out = mask_mul(out, masks["kv_heads"][:, None, None])
        out = out.reshape(b, t, d.num_heads, d.v_dim)
        out_proj = nn.DenseGeneral(c.width, axis=(-2, -1), use_bias=False, name="out", dtype=dt)
        return out_proj(out), cache


class LlamaMlp(nn.Module):
    """SwiGLU MLP, down(silu(gate(x)) * up(x) * mask)."""

    mlp_dim: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        dense = lambda feats, name: nn.Dense(feats, use_bias=False, name=name, dtype=self.dtype)
        y = nn.silu(dense(self.mlp_dim, "gate")(x)) * dense(self.mlp_dim, "up")(x)
        if mask is not None:
            sow_mask_input(self, "mlp", y)
            y = mask_mul(y, mask)
        return dense(self.width, "down")(y)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block; a branch with no weights left adds nothing (its norm's scale stays)."""

    config: LlamaConfig
    dims: LayerDims

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, masks: Mapping[str, Array], cache: Cache | None, index: Array | int
    ) -> tuple[Array, Cache | None]:
        c, d = self.config, self.dims
        y = RMSNorm(c.rms_eps, name="attn_norm")(x)
        if d.has_attention:
            attn_masks = {k: masks[k] for k in ("qk", "vo", "kv_heads") if k in masks}
            y, cache = LlamaAttention(c, d, name="attn")(y, positions, attn_masks, cache, index)
            x = x + y
        y = RMSNorm(c.rms_eps, name="mlp_norm")(x)
        if d.mlp_dim:
            x = x + LlamaMlp(d.mlp_dim, c.width, jnp.dtype(c.dtype), name="mlp")(y, masks.get("mlp"))
        return x, cache


class Llama(nn.Module):
    """Llama decoder taking `masks` (module docstring) or None; `layers` gives each block's dims (None:
    the dense model). tokens int [B, L] -> float32 logits [B, L, vocab], positions 0 .. L-1; with
    `cache=` (see `init_cache`) returns (logits, new cache) instead."""

    config: LlamaConfig
    layers: tuple[LayerDims, ...] | None = None

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        *,
        masks: Mapping[str, Array] | None = None,
        train: bool = False,
        cache: Cache | None = None,
        positions: Array | None = None,
    ) -> Array | tuple[Array, Cache]:
        del train  # no dropout
        c = self.config
        layers = self.layers if self.layers is not None else c.dense_layers()
        if len(layers) != c.depth:
            raise ConfigError(
                f"{len(layers)} layer dims given for a depth-{c.depth} model; give one per layer"
            )
        masks = {} if masks is None else masks
        t = tokens.shape[1]
        index = jnp.zeros((), jnp.int32) if cache is None else cache["length"]
        if positions is None:
            positions = index + jnp.arange(t, dtype=jnp.int32)
        dt = jnp.dtype(c.dtype)
        embed = nn.Embed(c.vocab_size, c.width, name="embed", dtype=dt)
        x = embed(tokens)
        new_layers = []
        for i, dims in enumerate(layers):
            layer_cache = None if cache is None else cache["layers"][i]
            layer_masks = {k: m[i] for k, m in masks.items()}
            x, layer_cache = LlamaBlock(c, dims, name=f"block_{i}")(
                x, positions, layer_masks, layer_cache, index
            )
            new_layers.append(layer_cache)
        x = RMSNorm(c.rms_eps, name="final_norm")(x)
        if c.tie_embeddings:  # = embed.attend(x), accumulated in float32
            logits = jnp.dot(x, embed.embedding.T.astype(dt), preferred_element_type=jnp.float32)
        else:
            f32_acc = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
            logits = nn.Dense(c.vocab_size, use_bias=False, name="lm_head", dtype=dt, dot_general=f32_acc)(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, {"length": cache["length"] + t, "layers": new_layers}
