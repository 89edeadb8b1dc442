"""Hugging Face Swin checkpoints (`SwinForImageClassification` / `SwinModel` directories) into our Swin.

Directory: config.json (model_type "swin": image_size, patch_size, embed_dim, depths, num_heads,
window_size, mlp_ratio, layer_norm_eps, qkv_bias, hidden_act "gelu", use_absolute_embeddings false) and
model.safetensors (or its shard index). Names (a `swin.` prefix, present in classifier checkpoints, is
dropped; torch Linear weights are [out, in], our kernels [in, ..., out]):
  embeddings.patch_embeddings.projection.{weight,bias}     -> patch_embed (conv [C0, 3, p, p])
  embeddings.norm                                         -> patch_norm
  encoder.layers.S.blocks.I.layernorm_before / _after     -> stage_S/block_I/ln1 / ln2
  encoder.layers.S.blocks.I.attention.self.{query,key,value}  -> .../attn/{query,key,value} [C, H, hd]
  encoder.layers.S.blocks.I.attention.self.relative_position_bias_table  -> .../attn/ (same name)
  encoder.layers.S.blocks.I.attention.output.dense        -> .../attn/out [H, hd, C]
  encoder.layers.S.blocks.I.intermediate.dense / output.dense  -> .../mlp/fc1 / fc2
  encoder.layers.S.downsample.{norm,reduction}            -> stage_{S+1}/downsample (HF merges at the end
                                                             of stage S, we at the start of stage S+1)
  layernorm                                               -> norm
  classifier                                              -> head (absent: a feature model, num_classes 0)
HF's patch merging concatenates the 2x2 neighbours in (row, col) order (0,0), (1,0), (0,1), (1,1), as ours.
Also read: the in-memory names of recent transformers (attention.{q,k,v,o}_proj,
attention.relative_position_bias.relative_position_bias_table, mlp.fc1/fc2); `relative_position_index`
buffers of older checkpoints are ignored (we recompute them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.importers._common import KeyReader, Params, torch_conv, torch_layer_norm, torch_linear
from spp_jax.importers.safetensors_dir import open_weights
from spp_jax.models.swin import SwinConfig

FIX = "the checkpoint does not match its config.json (embed_dim, depths, num_heads, window_size, mlp_ratio)"
_RENAMES = {  # recent transformers' in-memory names -> the saved (Hub) names
    ".attention.q_proj.": ".attention.self.query.",
    ".attention.k_proj.": ".attention.self.key.",
    ".attention.v_proj.": ".attention.self.value.",
    ".attention.o_proj.": ".attention.output.dense.",
    ".attention.relative_position_bias.": ".attention.self.",
    ".mlp.fc1.": ".intermediate.dense.",
    ".mlp.fc2.": ".output.dense.",
}


def _square(value: Any, name: str, source: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ConfigError(f"{source}: non-square {name} {value} is not supported; use a square one")
        value = value[0]
    return int(value)


def hf_swin_config(cfg: dict[str, Any], num_classes: int, source: str = "config.json") -> SwinConfig:
    """`SwinConfig` from a parsed HF config.json; `ConfigError` for what our Swin cannot represent."""
    if cfg.get("model_type", "swin") != "swin":
        raise ConfigError(
            f"{source}: model_type {cfg.get('model_type')!r} is not supported; only 'swin' (v1) is"
        )
    if cfg.get("use_absolute_embeddings", False):
        raise ConfigError(
            f"{source}: absolute position embeddings are not supported; use a model without them"
        )
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported; only 'gelu' is")
    if int(cfg.get("num_channels", 3)) != 3:
        raise ConfigError(f"{source}: num_channels {cfg['num_channels']} is not supported; only RGB (3) is")
    try:
        return SwinConfig(
            image_size=_square(cfg["image_size"], "image_size", source),
            patch_size=_square(cfg["patch_size"], "patch_size", source),
            embed_dim=int(cfg["embed_dim"]),
            depths=tuple(cfg["depths"]),
            num_heads=tuple(cfg["num_heads"]),
            window_size=int(cfg["window_size"]),
            mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
            num_classes=num_classes,
            ln_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e.args[0]!r}; it is not a Swin config") from e


def attention_params(q: Params, k: Params, v: Params, out: Params, table: np.ndarray, heads: int) -> Params:
    """Our WindowAttention params from Dense-layout q, k, v ([C, C]) and out ([C, C]) layers."""
    c = out["kernel"].shape[1]
    hd = c // heads
    per_head = lambda p: {"kernel": p["kernel"].reshape(c, heads, hd), "bias": p["bias"].reshape(heads, hd)}
    return {
        "query": per_head(q),
        "key": per_head(k),
        "value": per_head(v),
        "out": {"kernel": out["kernel"].reshape(heads, hd, c), "bias": out["bias"]},
        "relative_position_bias_table": table,
    }


def normalize_names(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the `swin.` prefix and `relative_position_index` buffers; map in-memory names to saved ones."""
    out = {}
    for key, value in flat.items():
        if key.endswith("relative_position_index"):
            continue
        key = key.removeprefix("swin.")
        for new, saved in _RENAMES.items():
            key = key.replace(new, saved)
        out[key] = value
    return out


def hf_swin_params(flat: dict[str, np.ndarray], c: SwinConfig, source: str, qkv_bias: bool = True) -> Params:
    """Our param tree (numpy float32) from normalized HF tensors (`normalize_names`); strict on keys and
    shapes. Without `qkv_bias` (config.json `qkv_bias: false`) the q, k, v biases are zeros."""
    r = KeyReader(flat, source, fix=FIX, model="Swin")
    d0, p = c.embed_dim, c.patch_size
    n_rel = (2 * c.window_size - 1) ** 2
    params: Params = {
        "patch_embed": torch_conv(r, "embeddings.patch_embeddings.projection", 3, d0, p),
        "patch_norm": torch_layer_norm(r, "embeddings.norm", d0),
    }
    for s in range(c.num_stages):
        d, h, m = c.dim(s), c.num_heads[s], c.mlp_dim(s)
        stage: Params = {}
        if s > 0:
            pre = f"encoder.layers.{s - 1}.downsample."
            stage["downsample"] = {
                "norm": torch_layer_norm(r, pre + "norm", 2 * d),
                "reduction": torch_linear(r, pre + "reduction", 2 * d, d, bias=False),
            }
        for i in range(c.depths[s]):
            pre = f"encoder.layers.{s}.blocks.{i}."
            att = pre + "attention.self."
            qkv = [torch_linear(r, att + n, d, d, bias=qkv_bias) for n in ("query", "key", "value")]
            if not qkv_bias:
                qkv = [{**x, "bias": np.zeros(d, np.float32)} for x in qkv]
            table = r.take(att + "relative_position_bias_table", (n_rel, h))
            stage[f"block_{i}"] = {
                "ln1": torch_layer_norm(r, pre + "layernorm_before", d),
                "attn": attention_params(
                    *qkv, torch_linear(r, pre + "attention.output.dense", d, d), table, h
                ),
                "ln2": torch_layer_norm(r, pre + "layernorm_after", d),
                "mlp": {
                    "fc1": torch_linear(r, pre + "intermediate.dense", d, m),
                    "fc2": torch_linear(r, pre + "output.dense", m, d),
                },
            }
        params[f"stage_{s}"] = stage
    params["norm"] = torch_layer_norm(r, "layernorm", c.num_features)
    if c.num_classes:
        params["head"] = torch_linear(r, "classifier", c.num_features, c.num_classes)
    r.finish()
    return params


def read_hf_swin(directory: str | os.PathLike) -> tuple[SwinConfig, Params]:
    """(config, params) of a HF Swin directory; num_classes is the classifier's size (0 without one)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointMismatch(f"{str(d)!r} is not a directory; give a Hugging Face Swin model directory")
    if not (d / "config.json").is_file():
        raise CheckpointMismatch(f"{d} has no config.json; it is not a Hugging Face model directory")
    cfg = json.loads((d / "config.json").read_text())
    flat = normalize_names({k: f.get(k) for k, f in open_weights(d).items()})
    num_classes = flat["classifier.weight"].shape[0] if "classifier.weight" in flat else 0
    config = hf_swin_config(cfg, num_classes, source=str(d / "config.json"))
    return config, hf_swin_params(flat, config, str(d), qkv_bias=bool(cfg.get("qkv_bias", True)))


__all__ = ["attention_params", "hf_swin_config", "hf_swin_params", "normalize_names", "read_hf_swin"]
