"""timm Swin Transformer (v1) checkpoints (`swin_*` state dicts, `.safetensors` or `.npz`) into our Swin.

The architecture is read from the tensor shapes (a state dict names no config): embed_dim and patch from
`patch_embed.proj.weight`, depths from the block indices, heads and window from each block's
`relative_position_bias_table` [(2w-1)^2, heads], mlp_ratio from `mlp.fc1`, num_classes from the head (0
without one). The input size is not stored: give the one the model is run and costed at.

timm names (torch Linear weights [out, in]):
  patch_embed.proj / patch_embed.norm                  -> patch_embed / patch_norm
  layers.S.blocks.I.norm1 / norm2                      -> stage_S/block_I/ln1 / ln2
  layers.S.blocks.I.attn.qkv [3C, C]                   -> .../attn/{query,key,value}: output rows are
                                                          ordered (q|k|v, head, head_dim), split here
  layers.S.blocks.I.attn.proj                          -> .../attn/out
  layers.S.blocks.I.attn.relative_position_bias_table  -> .../attn/ (same name)
  layers.S.blocks.I.mlp.fc1 / fc2                      -> .../mlp/fc1 / fc2
  layers.S.downsample.{norm,reduction}                 -> stage_S/downsample: recent timm merges at the
      start of stage S >= 1; older checkpoints (the original layout) at the end of stage S-1, recognised by
      a `layers.0.downsample`. timm's merge order of the 2x2 neighbours ((0,0), (1,0), (0,1), (1,1) in
      (row, col)) is ours.
  norm                                                 -> norm
  head.fc (recent) or head (older)                     -> head
`relative_position_index` and `attn_mask` buffers of older checkpoints are ignored (recomputed).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from spp_jax.errors import CheckpointMismatch
from spp_jax.importers._common import (
    KeyReader,
    Params,
    load_flat,
    torch_conv,
    torch_layer_norm,
    torch_linear,
)
from spp_jax.importers.swin_hf import attention_params
from spp_jax.models.swin import SwinConfig

SOURCE = "timm Swin checkpoint"
FIX = "the checkpoint is not a Swin v1 with per-stage width embed_dim * 2^stage"
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


def _normalize(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Recent timm names: merging at the start of stage S >= 1, head under `head.fc`; buffers dropped."""
    old = "layers.0.downsample.reduction.weight" in sd
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if old:
            key = re.sub(
                r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.", key
            )
            key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
        out[key] = value
    return out


def timm_swin_config(sd: Mapping[str, np.ndarray], image_size: int = 224) -> SwinConfig:
    """The SwinConfig a normalized timm state dict implies (module docstring), run at `image_size`."""
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointMismatch(f"{SOURCE}: missing key 'patch_embed.proj.weight'; is it a timm Swin?")
    embed_dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depths: dict[int, int] = {}
    for key in sd:
        if m := _BLOCK.match(key):
            depths[int(m[1])] = max(depths.get(int(m[1]), 0), int(m[2]) + 1)
    if sorted(depths) != list(range(len(depths))) or not depths:
        raise CheckpointMismatch(f"{SOURCE}: stages {sorted(depths)} are not numbered 0..n-1; is it a Swin?")
    heads, windows = [], set()
    for s in range(len(depths)):
        key = f"layers.{s}.blocks.0.attn.relative_position_bias_table"
        if key not in sd:
            raise CheckpointMismatch(f"{SOURCE}: missing key {key!r}; is it a Swin v1 checkpoint?")
        n_rel, h = sd[key].shape
        heads.append(int(h))
        windows.add((math.isqrt(int(n_rel)) + 1) // 2)
    if len(windows) != 1:
        raise CheckpointMismatch(
            f"{SOURCE}: stages use different windows {sorted(windows)}; one is supported"
        )
    fc1 = sd.get("layers.0.blocks.0.mlp.fc1.weight")
    head = sd.get("head.fc.weight")
    return SwinConfig(
        image_size=image_size,
        patch_size=int(patch),
        embed_dim=int(embed_dim),
        depths=tuple(depths[s] for s in range(len(depths))),
        num_heads=tuple(heads),
        window_size=windows.pop(),
        mlp_ratio=fc1.shape[0] / embed_dim if fc1 is not None else 4.0,
        num_classes=0 if head is None else int(head.shape[0]),
    )


def read_timm_swin(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any], image_size: int = 224
) -> tuple[SwinConfig, Params]:
    """(config, params) of a timm Swin checkpoint (state dict with numpy/torch values, `.safetensors` or
    `.npz`); strict on keys and shapes. A missing `attn.qkv.bias` (qkv_bias=False) becomes zeros."""
    sd = _normalize(load_flat(path_or_state_dict))
    c = timm_swin_config(sd, image_size)
    r = KeyReader(sd, SOURCE, fix=FIX, model="Swin")
    n_rel = (2 * c.window_size - 1) ** 2
    params: Params = {
        "patch_embed": torch_conv(r, "patch_embed.proj", 3, c.embed_dim, c.patch_size),
        "patch_norm": torch_layer_norm(r, "patch_embed.norm", c.embed_dim),
    }
    for s in range(c.num_stages):
        d, h, m = c.dim(s), c.num_heads[s], c.mlp_dim(s)
        stage: Params = {}
        if s > 0:
            pre = f"layers.{s}.downsample."
            stage["downsample"] = {
                "norm": torch_layer_norm(r, pre + "norm", 2 * d),
                "reduction": torch_linear(r, pre + "reduction", 2 * d, d, bias=False),
            }
        for i in range(c.depths[s]):
            pre = f"layers.{s}.blocks.{i}."
            w = r.take(pre + "attn.qkv.weight", (3 * d, d)).reshape(3, d, d)  # [(q|k|v), out, in]
            key_b = pre + "attn.qkv.bias"
            b = r.take(key_b, (3 * d,)).reshape(3, d) if r.has(key_b) else np.zeros((3, d), np.float32)
            q, k, v = ({"kernel": np.ascontiguousarray(w[j].T), "bias": b[j]} for j in range(3))
            table = r.take(pre + "attn.relative_position_bias_table", (n_rel, h))
            stage[f"block_{i}"] = {
                "ln1": torch_layer_norm(r, pre + "norm1", d),
                "attn": attention_params(q, k, v, torch_linear(r, pre + "attn.proj", d, d), table, h),
                "ln2": torch_layer_norm(r, pre + "norm2", d),
                "mlp": {
                    "fc1": torch_linear(r, pre + "mlp.fc1", d, m),
                    "fc2": torch_linear(r, pre + "mlp.fc2", m, d),
                },
            }
        params[f"stage_{s}"] = stage
    params["norm"] = torch_layer_norm(r, "norm", c.num_features)
    if c.num_classes:
        params["head"] = torch_linear(r, "head.fc", c.num_features, c.num_classes)
    r.finish()
    return c, params


__all__ = ["read_timm_swin", "timm_swin_config"]
