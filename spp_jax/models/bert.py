"""BERT-style text encoder (BERT, MiniLM / sentence-transformers, CLIP's text tower) in Flax Linen that
takes a mask pytree.

The blocks are the ViT's masked attention and MLP (`spp_jax.models.layers`), so the masks, the pruned shapes
(`LayerDims` per layer) and the slicing are the ViT's (algorithm.md §2, §5):
    qk    [depth, head_dim], vo [depth, head_dim], mlp [depth, mlp_dim], heads [depth, heads] (optional)
`masks=None` and all-ones masks give the dense function exactly; the attention scale is always the
original 1/sqrt(head_dim).

Two block orders:
    norm="post" (BERT):      x = LN1(x + Attn(x)),  x = LN2(x + MLP(x))
    norm="pre"  (CLIP text): x = x + Attn(LN1(x)),  x = x + MLP(LN2(x))
Embeddings: word + position (+ token type), then a LayerNorm (`embed_norm`, BERT). Padding: the attention
mask (1 = token, 0 = padding) removes padded KEYS with a large negative logit bias (combined with the
causal order when `causal`), so padded tokens never change the valid tokens' outputs, and the "mean"
pooling averages the valid tokens only (sentence-transformers' formula).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spp_jax.compute import check_compute
from spp_jax.errors import ConfigError
from spp_jax.models.layers import LayerDims, MaskedAttention, MaskedMlp

Array = jax.Array

NORMS = ("post", "pre")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
POOLS = ("mean", "cls", "eos", "none")
NEG_INF = -1e9  # logit bias of a removed key: exp underflows to exactly 0 in float32, sums never overflow


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a (dense) BERT-style encoder.

    Attributes:
      vocab_size, width, depth, num_heads, mlp_dim: the usual sizes; head_dim = width // num_heads.
      max_len: rows of the position-embedding table (the longest input).
      type_vocab_size: rows of the token-type embedding (0 = none).
      seq_len: the sequence length the model is run and costed at (the mask groups' MACs).
      ln_eps: LayerNorm epsilon.
      norm: "post" (BERT: x = LN(x + f(x))) or "pre" (CLIP text: x = x + f(LN(x))).
      embed_norm: LayerNorm after the embedding sum (BERT).
      final_norm: LayerNorm after the last block (CLIP text).
      causal: causal self-attention (CLIP text).
      activation: "gelu" (exact erf), "gelu_tanh" or "quick_gelu" (x * sigmoid(1.702 x), CLIP).
      pool: "mean" (over the valid tokens, sentence-transformers), "cls" (first token), "eos" (CLIP's rule,
        see `eos_token_id`) or "none" (the hidden states [B, L, width]).
      eos_token_id: pool="eos" reads the position of argmax(input_ids) when it is 2 (HF CLIPTextTransformer's
        legacy rule), else the first position whose id is eos_token_id.
      num_classes: > 0 adds a zero-initialised Dense "head" on the pooled features (logits out).
      mlp_mask_pre_act: apply the mlp mask before the activation (reference code) or after it.
      dropout_rate: hidden dropout (embeddings and both residual branches), active only with train=True.
      dtype: compute dtype, "float32" or "bfloat16" (spp_jax/models/vit.py): parameters, masks, LayerNorm
        statistics, softmax and the pooled output stay float32. (The padding bias keeps the einsum core.)
    """

    vocab_size: int = 30522
    width: int = 384
    depth: int = 6
    num_heads: int = 12
    mlp_dim: int = 1536
    max_len: int = 512
    type_vocab_size: int = 2
    seq_len: int = 128
    ln_eps: float = 1e-12
    norm: str = "post"
    embed_norm: bool = True
    final_norm: bool = False
    causal: bool = False
    activation: str = "gelu"
    pool: str = "mean"
    eos_token_id: int = 2
    num_classes: int = 0
    mlp_mask_pre_act: bool = True
    dropout_rate: float = 0.0
    dtype: str = "float32"

    def __post_init__(self):
        check_compute(self.dtype, "xla")
        if self.width % self.num_heads:
            raise ConfigError(
                f"width {self.width} is not divisible by num_heads {self.num_heads}; "
                "use a width that is a multiple of num_heads"
            )
        for field, value, allowed in (
            ("norm", self.norm, NORMS),
            ("activation", self.activation, ACTIVATIONS),
            ("pool", self.pool, POOLS),
        ):
            if value not in allowed:
                raise ConfigError(f"{field}={value!r} is not allowed; use one of {allowed}")
        if not 1 <= self.seq_len <= self.max_len:
            raise ConfigError(
                f"seq_len {self.seq_len} is not in [1, max_len={self.max_len}]; "
                "use a sequence length the position table covers"
            )
        if self.pool == "none" and self.num_classes:
            raise ConfigError(
                "pool='none' returns hidden states, which a classifier head does not take; "
                "set num_classes=0 or pool to 'mean', 'cls' or 'eos'"
            )
        if not 0 <= self.dropout_rate < 1:
            raise ConfigError(f"dropout_rate={self.dropout_rate} is not in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def dense_layers(self) -> tuple[LayerDims, ...]:
        d = LayerDims(self.num_heads, self.head_dim, self.head_dim, self.mlp_dim)
        return (d,) * self.depth

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BertConfig:
        return cls(**d)


VARIANTS: dict[str, dict[str, Any]] = {
    # Tiny model for tests.
    "mu": dict(vocab_size=64, width=32, depth=2, num_heads=4, mlp_dim=64, max_len=32, seq_len=16),
    # sentence-transformers/all-MiniLM-L6-v2 (the defaults).
    "minilm-l6": dict(),
    "bert-base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
}


def bert_config(variant: str, **overrides: Any) -> BertConfig:
    """The config of a named variant ("mu", "minilm-l6", "bert-base") with overrides."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown BERT variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return BertConfig(**{**VARIANTS[variant], **overrides})


def attention_bias(valid: Array | None, length: int, causal: bool) -> Array | None:
    """Additive attention-logit bias [B or 1, 1, L or 1, L]: 0 where a query may read a key, NEG_INF where
    the key is padding (`valid` [B, L] False) or, when `causal`, later than the query. None: no bias."""
    allowed = None if valid is None else valid[:, None, None, :]
    if causal:
        order = jnp.tril(jnp.ones((length, length), bool))[None, None]
        allowed = order if allowed is None else allowed & order
    return None if allowed is None else jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)


class BertBlock(nn.Module):
    """One encoder block (post- or pre-LN, `config.norm`) built from its `LayerDims`."""

    config: BertConfig
    dims: LayerDims

    @nn.compact
    def __call__(self, x: Array, masks: Mapping[str, Array], bias: Array | None, train: bool) -> Array:
        c = self.config
        dt = jnp.dtype(c.dtype)
        attn_masks = {k: masks[k] for k in ("qk", "vo", "heads") if k in masks}
        attn = MaskedAttention(self.dims, c.width, c.head_dim, dt, name="attn")
        mlp = MaskedMlp(
            self.dims.mlp_dim, c.width, c.mlp_mask_pre_act, activation=c.activation, dtype=dt, name="mlp"
        )
        ln1 = nn.LayerNorm(epsilon=c.ln_eps, name="ln1", dtype=dt)
        ln2 = nn.LayerNorm(epsilon=c.ln_eps, name="ln2", dtype=dt)
        drop = nn.Dropout(c.dropout_rate, deterministic=not train)
        if c.norm == "pre":
            x = x + drop(attn(ln1(x), attn_masks, bias))
            return x + drop(mlp(ln2(x), masks.get("mlp")))
        x = ln1(x + drop(attn(x, attn_masks, bias)))
        return ln2(x + drop(mlp(x, masks.get("mlp"))))


class BertEncoder(nn.Module):
    """BERT-style encoder taking `masks` (dict of [depth, size] arrays, see module docstring) or None.

    `layers` gives each block's dims; None means the dense model (`config.dense_layers()`).
    Inputs: input_ids int [B, L] (L <= max_len); attention_mask [B, L], 1 = token, 0 = padding (None = all
    valid); token_type_ids [B, L] (None = all 0). Output: logits [B, num_classes] if num_classes, else the
    pooled features [B, width]; pool="none": the hidden states [B, L, width].
    """

    config: BertConfig
    layers: tuple[LayerDims, ...] | None = None

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        *,
        masks: Mapping[str, Array] | None = None,
        train: bool = False,
    ) -> Array:
        c = self.config
        layers = self.layers if self.layers is not None else c.dense_layers()
        if len(layers) != c.depth:
            raise ConfigError(
                f"{len(layers)} layer dims given for a depth-{c.depth} model; give one per layer"
            )
        masks = {} if masks is None else masks
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ConfigError(f"input_ids has shape {input_ids.shape}; give token ids [batch, length]")
        b, n = input_ids.shape
        if n > c.max_len:
            raise ConfigError(
                f"input length {n} exceeds the {c.max_len} position embeddings; truncate to {c.max_len}"
            )
        valid = None if attention_mask is None else jnp.asarray(attention_mask) > 0
        dt = jnp.dtype(c.dtype)
        x = nn.Embed(c.vocab_size, c.width, name="word_embeddings", dtype=dt)(input_ids)
        x = x + nn.Embed(c.max_len, c.width, name="position_embeddings", dtype=dt)(jnp.arange(n))[None]
        if c.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros((b, n), jnp.int32)
            types = nn.Embed(c.type_vocab_size, c.width, name="token_type_embeddings", dtype=dt)
            x = x + types(token_type_ids)
        elif token_type_ids is not None:
            raise ConfigError("token_type_ids given to a model without token types (type_vocab_size=0)")
        if c.embed_norm:
            x = nn.LayerNorm(epsilon=c.ln_eps, name="embed_norm", dtype=dt)(x)
        x = nn.Dropout(c.dropout_rate, deterministic=not train)(x)
        bias = attention_bias(valid, n, c.causal)
        for i, dims in enumerate(layers):
            layer_masks = {k: m[i] for k, m in masks.items()}
            x = BertBlock(c, dims, name=f"encoderblock_{i}")(x, layer_masks, bias, train)
        if c.final_norm:
            x = nn.LayerNorm(epsilon=c.ln_eps, name="final_norm", dtype=jnp.float32)(x)
        x = x.astype(jnp.float32)
        if c.pool == "none":
            return x
        if c.pool == "mean":
            w = jnp.ones((b, n), x.dtype) if valid is None else valid.astype(x.dtype)
            x = (x * w[..., None]).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-9)[:, None]
        elif c.pool == "cls":
            x = x[:, 0]
        else:
            if c.eos_token_id == 2:
                pos = jnp.argmax(input_ids, axis=-1)
            else:
                pos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
            x = x[jnp.arange(b), pos]
        if c.num_classes:
            x = nn.Dense(c.num_classes, name="head", kernel_init=nn.initializers.zeros)(x)
        return x


__all__ = ["VARIANTS", "BertConfig", "BertEncoder", "attention_bias", "bert_config"]
