"""Hugging Face CLIP checkpoints (`CLIPModel` directories) into our two-tower model
(`spp_jax.models.clip.TwoTower`).

Directory: config.json (model_type "clip" with `vision_config` and `text_config`, `projection_dim`) and
model.safetensors (or its shard index). Names (torch Linear weights are [out, in], our kernels [in, .., out]):
  vision_model.embeddings.patch_embedding.weight       -> image/embedding (conv [D, 3, p, p], no bias)
  vision_model.embeddings.class_embedding              -> image/cls [1, 1, D]
  vision_model.embeddings.position_embedding.weight    -> image/pos_embedding [1, 1 + G*G, D] (cls slot first)
  vision_model.pre_layrnorm                            -> image/ln_pre
  vision_model.post_layernorm                          -> image/encoder_norm (HF applies it to the pooled
                                                          cls token; a LayerNorm is per token, so it equals
                                                          our final norm followed by cls pooling)
  text_model.embeddings.token_embedding / position_embedding  -> text/word_embeddings / position_embeddings
  text_model.final_layer_norm                          -> text/final_norm
  {vision,text}_model.encoder.layers.I.layer_norm1 / layer_norm2          -> <tower>/encoderblock_I/ln1 / ln2
  {vision,text}_model.encoder.layers.I.self_attn.{q,k,v}_proj / out_proj  -> .../attn/{query,key,value} /
                                                                             out ([D, H, hd] / [H, hd, D])
  {vision,text}_model.encoder.layers.I.mlp.fc1 / fc2                      -> .../mlp/fc1 / fc2
  visual_projection / text_projection (no bias)        -> image_proj / text_proj
  logit_scale                                          -> logit_scale
The towers are CLIP's: the vision tower pre-LN with `ln_pre`, no patch bias, cls pooling; the text tower
pre-LN, causal, final norm, pooled at the eos token (`eos_token_id` 2: argmax of the ids, HF's legacy rule).
`position_ids` buffers of older checkpoints are ignored.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.importers._common import KeyReader, Params, torch_layer_norm, torch_linear
from spp_jax.importers.safetensors_dir import open_weights
from spp_jax.models.bert import BertConfig
from spp_jax.models.clip import ClipConfig
from spp_jax.models.vit import ViTConfig

FIX = "the checkpoint does not match its config.json (hidden_size, layers, heads, intermediate_size, sizes)"
_ACTIVATIONS = {  # HF hidden_act -> ours
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
# transformers' CLIPVisionConfig / CLIPTextConfig / CLIPConfig defaults, for keys a config.json leaves out
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)


def _activation(cfg: dict[str, Any], tower: str, source: str) -> str:
    act = cfg["hidden_act"]
    if act not in _ACTIVATIONS:
        raise ConfigError(
            f"{source}: {tower} hidden_act {act!r} is not supported; use one of {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[act]


def hf_clip_config(
    cfg: dict[str, Any],
    image_size: int | None = None,
    seq_len: int | None = None,
    source: str = "config.json",
) -> ClipConfig:
    """`ClipConfig` from a parsed HF CLIPModel config.json; `image_size` (the input side the image tower runs
    and is costed at; None = the checkpoint's) and `seq_len` (the text length it is costed at; None = the
    position table's length). `ConfigError` for a config that is not a CLIPModel's."""
    if cfg.get("model_type") != "clip":
        raise ConfigError(
            f"{source}: model_type {cfg.get('model_type')!r} is not a CLIP model; give a CLIPModel directory "
            "(model_type 'clip', both towers)"
        )
    if not isinstance(cfg.get("vision_config"), dict) or not isinstance(cfg.get("text_config"), dict):
        raise ConfigError(f"{source}: no vision_config / text_config; it is not a CLIPModel config")
    v = {**_VISION_DEFAULTS, **cfg["vision_config"]}
    t = {**_TEXT_DEFAULTS, **cfg["text_config"]}
    if int(v["num_channels"]) != 3:
        raise ConfigError(f"{source}: num_channels {v['num_channels']} is not supported; only RGB (3) is")
    patch, size = int(v["patch_size"]), int(v["image_size"])
    if size % patch:
        raise ConfigError(f"{source}: image_size {size} is not a multiple of patch_size {patch}")
    max_len = int(t["max_position_embeddings"])
    image = ViTConfig(
        width=int(v["hidden_size"]),
        depth=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        mlp_dim=int(v["intermediate_size"]),
        patch_size=patch,
        num_classes=0,
        image_size=int(image_size or size),
        posemb_grid=size // patch,
        posemb_cls=True,
        cls_token=True,
        pool="cls",
        ln_eps=float(v["layer_norm_eps"]),
        ln_pre=True,
        patch_bias=False,
        activation=_activation(v, "vision", source),
    )
    text = BertConfig(
        vocab_size=int(t["vocab_size"]),
        width=int(t["hidden_size"]),
        depth=int(t["num_hidden_layers"]),
        num_heads=int(t["num_attention_heads"]),
        mlp_dim=int(t["intermediate_size"]),
        max_len=max_len,
        type_vocab_size=0,
        seq_len=int(seq_len or max_len),
        ln_eps=float(t["layer_norm_eps"]),
        norm="pre",
        embed_norm=False,
        final_norm=True,
        causal=True,
        activation=_activation(t, "text", source),
        pool="eos",
        eos_token_id=int(t["eos_token_id"]),
        num_classes=0,
    )
    return ClipConfig(
        image=image,
        text=text,
        embed_dim=int(cfg.get("projection_dim", 512)),
        logit_scale_init=float(cfg.get("logit_scale_init_value", math.log(1 / 0.07))),
    )


def _block(r: KeyReader, pre: str, d: int, h: int, m: int) -> Params:
    """One CLIPEncoderLayer `pre` as our block (ln1, attn, ln2, mlp)."""
    hd = d // h
    att = pre + "self_attn."
    per_head = lambda p: {"kernel": p["kernel"].reshape(d, h, hd), "bias": p["bias"].reshape(h, hd)}
    out = torch_linear(r, att + "out_proj", d, d)
    return {
        "ln1": torch_layer_norm(r, pre + "layer_norm1", d),
        "attn": {
            "query": per_head(torch_linear(r, att + "q_proj", d, d)),
            "key": per_head(torch_linear(r, att + "k_proj", d, d)),
            "value": per_head(torch_linear(r, att + "v_proj", d, d)),
            "out": {"kernel": out["kernel"].reshape(h, hd, d), "bias": out["bias"]},
        },
        "ln2": torch_layer_norm(r, pre + "layer_norm2", d),
        "mlp": {"fc1": torch_linear(r, pre + "mlp.fc1", d, m), "fc2": torch_linear(r, pre + "mlp.fc2", m, d)},
    }


def hf_clip_params(flat: dict[str, np.ndarray], config: ClipConfig, source: str) -> Params:
    """Our TwoTower param tree (numpy float32) from HF CLIPModel tensors; strict on keys and shapes."""
    r = KeyReader(flat, source, fix=FIX, model="CLIP")
    for key in list(flat):
        if key.endswith("position_ids"):
            r.ignore(key)
    v, t, e = config.image, config.text, config.embed_dim
    d, p = v.width, v.patch_size
    vm, tm = "vision_model.", "text_model."
    conv = r.take(vm + "embeddings.patch_embedding.weight", (d, 3, p, p))
    image: Params = {
        "embedding": {"kernel": np.ascontiguousarray(conv.transpose(2, 3, 1, 0))},
        "cls": r.take(vm + "embeddings.class_embedding", (d,)).reshape(1, 1, d),
        "pos_embedding": r.take(vm + "embeddings.position_embedding.weight", (1 + v.posemb_grid**2, d))[None],
        "ln_pre": torch_layer_norm(r, vm + "pre_layrnorm", d),
        "encoder_norm": torch_layer_norm(r, vm + "post_layernorm", d),
    }
    for i in range(v.depth):
        image[f"encoderblock_{i}"] = _block(r, f"{vm}encoder.layers.{i}.", d, v.num_heads, v.mlp_dim)
    dt = t.width
    text: Params = {
        "word_embeddings": {
            "embedding": r.take(tm + "embeddings.token_embedding.weight", (t.vocab_size, dt))
        },
        "position_embeddings": {
            "embedding": r.take(tm + "embeddings.position_embedding.weight", (t.max_len, dt))
        },
        "final_norm": torch_layer_norm(r, tm + "final_layer_norm", dt),
    }
    for i in range(t.depth):
        text[f"encoderblock_{i}"] = _block(r, f"{tm}encoder.layers.{i}.", dt, t.num_heads, t.mlp_dim)
    params: Params = {
        "image": image,
        "text": text,
        "image_proj": torch_linear(r, "visual_projection", d, e, bias=False),
        "text_proj": torch_linear(r, "text_projection", dt, e, bias=False),
        "logit_scale": np.asarray(r.take("logit_scale", ()), np.float32).reshape(()),
    }
    r.finish()
    return params


def read_hf_clip(
    directory: str | os.PathLike, image_size: int | None = None, seq_len: int | None = None
) -> tuple[ClipConfig, Params]:
    """(ClipConfig, TwoTower params) of a Hugging Face CLIPModel directory (module docstring);
    `image_size` / `seq_len` as in `hf_clip_config`."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointMismatch(f"{d} is not a directory; give a Hugging Face CLIP model directory")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise CheckpointMismatch(f"{d} has no config.json; give a Hugging Face CLIP model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointMismatch(f"{cfg_file} is not readable JSON ({e}); re-download the model") from None
    if not isinstance(cfg, dict):
        raise CheckpointMismatch(f"{cfg_file} is not a JSON object; re-download the model")
    config = hf_clip_config(cfg, image_size, seq_len, source=str(cfg_file))
    files = open_weights(d)
    flat = {name: f.get(name) for name, f in files.items()}
    return config, hf_clip_params(flat, config, f"{d}")


__all__ = ["hf_clip_config", "hf_clip_params", "read_hf_clip"]
