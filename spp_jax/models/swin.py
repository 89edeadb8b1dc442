"""Swin Transformer (v1) image classifier in Flax Linen that takes a mask pytree.

Layout: a 4x4 (`patch_size`) conv patch embedding + LayerNorm; stages of pre-LN blocks, each
x + DropPath(WindowAttention(LN(x))), then x + DropPath(MLP(LN(x))) (exact GELU), the odd blocks of a stage
with shifted windows (spp_jax.models.swin_attention: window, padding and shift rules); between stages a
patch merging (2x2 neighbours concatenated in the order (0,0), (1,0), (0,1), (1,1) of (row, col) offsets,
LayerNorm, bias-free linear 4C -> 2C; an odd side is zero-padded first); final LayerNorm, global average
pool, linear head (num_classes = 0: the pooled features). Stage s has width embed_dim * 2^s.

One module serves the dense and every pruned model: each block is built from its own `LayerDims`
(`layers`, flat over the blocks of all stages in order). Masks are keyed `stage{s}/{kind}`, each
[blocks in stage s, size]:
    stage{s}/qk    [., head_dim]   scales q[..., j] and k[..., j] of every head
    stage{s}/vo    [., head_dim]   scales v[..., j] of every head
    stage{s}/mlp   [., mlp_dim]    scales the first MLP layer's output, before the GELU
    stage{s}/heads [., num_heads]  optional, scales each head's output
Missing keys are unmasked; all-ones masks give the dense function exactly. The attention scale is always
the stage's original 1/sqrt(head_dim), so an extracted model equals the binary-masked dense one.
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
from spp_jax.models.layers import DropPath, LayerDims, MaskedMlp
from spp_jax.models.swin_attention import (
    WindowAttention,
    from_windows,
    shift_mask,
    to_windows,
    window_geometry,
)

Array = jax.Array
KINDS = ("qk", "vo", "mlp", "heads")
STEM_LN_EPS = 1e-5  # patch-embedding and patch-merging LayerNorms (torch's default in every Swin source)


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Architecture of a (dense) Swin Transformer.

    Attributes:
      image_size: input side the model is costed at (any input side runs; see swin_attention).
      patch_size, embed_dim: patch side and width of stage 0.
      depths, num_heads: blocks and attention heads per stage.
      window_size: attention window side (and the side of the relative position tables).
      mlp_ratio: MLP hidden width / stage width.
      num_classes: classifier outputs (0 = no head, the model returns pooled features).
      ln_eps: epsilon of the block and final LayerNorms (Hugging Face's `layer_norm_eps`).
      droppath_rate: stochastic depth, linear from 0 over all blocks to this rate, only with train=True.
      dtype: compute dtype, "float32" or "bfloat16" (spp_jax/models/vit.py); parameters, masks, norm
        statistics, attention logits and softmax, and the output stay float32.
    """

    image_size: int = 224
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    ln_eps: float = 1e-5
    droppath_rate: float = 0.0
    dtype: str = "float32"

    def __post_init__(self):
        check_compute(self.dtype, "xla")
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        if not self.depths or len(self.depths) != len(self.num_heads) or min(self.depths) < 1:
            raise ConfigError(
                f"depths {self.depths} and num_heads {self.num_heads} must be non-empty, of equal length, "
                "with at least one block per stage"
            )
        for s, h in enumerate(self.num_heads):
            if h < 1 or self.dim(s) % h:
                raise ConfigError(
                    f"stage {s} width {self.dim(s)} is not divisible by its {h} heads; change num_heads"
                )
        if self.image_size % self.patch_size:
            p = self.patch_size
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {p}; "
                f"use a multiple of {p}, e.g. {max(1, round(self.image_size / p)) * p}"
            )
        if not 0.0 <= self.droppath_rate < 1.0:
            raise ConfigError(f"droppath_rate {self.droppath_rate} is not in [0, 1); use e.g. 0.1")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def depth(self) -> int:
        return sum(self.depths)

    def dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def head_dim(self, stage: int) -> int:
        return self.dim(stage) // self.num_heads[stage]

    def mlp_dim(self, stage: int) -> int:
        return int(self.mlp_ratio * self.dim(stage))

    @property
    def num_features(self) -> int:
        return self.dim(self.num_stages - 1)

    def first_block(self, stage: int) -> int:
        """Index of the stage's first block in the flat block order."""
        return sum(self.depths[:stage])

    def sides(self, image_size: int | None = None) -> tuple[int, ...]:
        """Feature-map side of each stage for a square input (merging rounds odd sides up)."""
        side = -(-(image_size or self.image_size) // self.patch_size)
        out = [side]
        for _ in range(1, self.num_stages):
            side = -(-side // 2)
            out.append(side)
        return tuple(out)

    def dense_layers(self) -> tuple[LayerDims, ...]:
        return tuple(
            LayerDims(self.num_heads[s], self.head_dim(s), self.head_dim(s), self.mlp_dim(s))
            for s in range(self.num_stages)
            for _ in range(self.depths[s])
        )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SwinConfig:
        return cls(**d)


VARIANTS: dict[str, dict[str, Any]] = {
    # Tiny model for tests: 16x16 then 8x8 tokens, windows of 4 (shifted in both stages).
    "mu": dict(image_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4),
    # Small model trained from scratch on 32 px images: 16x16, 8x8, 4x4 tokens (the last map is one window).
    "nano": dict(
        image_size=32, patch_size=2, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4
    ),
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


def swin_config(variant: str, **overrides: Any) -> SwinConfig:
    """The config of a named variant ("mu", "nano", "T", "S", "B"; T/S/B: 224 px, window 7) with overrides."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown Swin variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return SwinConfig(**{**VARIANTS[variant], **overrides})


class PatchMerging(nn.Module):
    """2x2 neighbour concat ((0,0), (1,0), (0,1), (1,1) row/col offsets) + LayerNorm + linear 4C -> 2C."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _, h, w, _ = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = nn.LayerNorm(epsilon=STEM_LN_EPS, name="norm", dtype=self.dtype)(x)
        return nn.Dense(self.width, use_bias=False, name="reduction", dtype=self.dtype)(x)


class SwinBlock(nn.Module):
    """Pre-LN Swin block on a [B, H, W, C] map: windowed attention (shifted if `shifted`), then the MLP."""

    config: SwinConfig
    stage: int
    dims: LayerDims
    shifted: bool
    droppath: float = 0.0

    @nn.compact
    def __call__(self, x: Array, masks: Mapping[str, Array], train: bool) -> Array:
        c, s = self.config, self.stage
        _, height, width, dim = x.shape
        win, shift, hp, wp = window_geometry(height, width, c.window_size, self.shifted)
        dt = jnp.dtype(c.dtype)
        y = nn.LayerNorm(epsilon=c.ln_eps, name="ln1", dtype=dt)(x)
        y = jnp.pad(y, ((0, 0), (0, hp - height), (0, wp - width), (0, 0)))
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        attn = WindowAttention(self.dims, dim, c.head_dim(s), c.window_size, f"stage{s}/", dt, name="attn")
        attn_masks = {k: masks[k] for k in ("qk", "vo", "heads") if k in masks}
        mask = shift_mask(hp, wp, win, shift) if shift else None
        y = from_windows(attn(to_windows(y, win), win, mask, attn_masks), win, hp, wp)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + DropPath(self.droppath)(y[:, :height, :width], train)
        y = nn.LayerNorm(epsilon=c.ln_eps, name="ln2", dtype=dt)(x)
        mlp = MaskedMlp(self.dims.mlp_dim, dim, group=f"stage{s}/mlp", dtype=dt, name="mlp")
        y = mlp(y, masks.get("mlp"))
        return x + DropPath(self.droppath)(y, train)


class SwinStage(nn.Module):
    """Patch merging (stages after the first), then the stage's blocks; odd blocks use shifted windows."""

    config: SwinConfig
    stage: int
    layers: tuple[LayerDims, ...]

    @nn.compact
    def __call__(self, x: Array, masks: Mapping[str, Array], train: bool) -> Array:
        c, s = self.config, self.stage
        if s > 0:
            x = PatchMerging(c.dim(s), jnp.dtype(c.dtype), name="downsample")(x)
        for i, dims in enumerate(self.layers):
            rate = c.droppath_rate * (c.first_block(s) + i) / max(c.depth - 1, 1)
            block = SwinBlock(c, s, dims, shifted=i % 2 == 1, droppath=rate, name=f"block_{i}")
            x = block(x, {k: m[i] for k, m in masks.items()}, train)
        return x


class SwinTransformer(nn.Module):
    """Swin taking `masks` (dict of [blocks in stage, size] arrays keyed `stage{s}/{kind}`) or None.

    `layers` gives each block's dims, flat over all stages; None means the dense model.
    Input: images [B, H, W, 3] float (zero-padded at the bottom/right to a multiple of the patch size).
    Output: logits [B, num_classes] (pooled features [B, num_features] if num_classes == 0).
    """

    config: SwinConfig
    layers: tuple[LayerDims, ...] | None = None

    @nn.compact
    def __call__(
        self, images: Array, *, masks: Mapping[str, Array] | None = None, train: bool = False
    ) -> Array:
        c = self.config
        layers = self.layers if self.layers is not None else c.dense_layers()
        if len(layers) != c.depth:
            raise ConfigError(
                f"{len(layers)} layer dims given for a {c.depth}-block Swin; give one per block"
            )
        masks = {} if masks is None else masks
        p = c.patch_size
        _, h, w, _ = images.shape
        images = jnp.pad(images, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
        dt = jnp.dtype(c.dtype)
        embed = nn.Conv(c.embed_dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed", dtype=dt)
        x = nn.LayerNorm(epsilon=STEM_LN_EPS, name="patch_norm", dtype=dt)(embed(images))
        for s in range(c.num_stages):
            stage_layers = tuple(layers[c.first_block(s) : c.first_block(s + 1)])
            stage_masks = {k.split("/", 1)[1]: m for k, m in masks.items() if k.startswith(f"stage{s}/")}
            x = SwinStage(c, s, stage_layers, name=f"stage_{s}")(x, stage_masks, train)
        x = nn.LayerNorm(epsilon=c.ln_eps, name="norm", dtype=jnp.float32)(x).mean(axis=(1, 2))
        if c.num_classes:
            x = nn.Dense(c.num_classes, name="head", kernel_init=nn.initializers.zeros)(x)
        return x
