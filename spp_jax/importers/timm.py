"""timm ViT / DeiT / DeiT-III checkpoints (state dicts, `.safetensors` or `.npz` with timm key names).

timm layout: torch Linear weights [out, in] (transposed here), the fused `attn.qkv` [3D, D] whose output rows
are ordered (q|k|v, head, head_dim), `pos_embed` [1, N(+1), D] with a cls slot first unless the model was
built with `no_embed_class=True` (DeiT-III), LayerScale as `ls1.gamma` / `ls2.gamma`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from spp_jax.errors import ConfigError
from spp_jax.importers._common import KeyReader, Params, head_features, load_flat
from spp_jax.models.vit import ViTConfig

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "small": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "large": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}
_NAME = re.compile(r"^(vit|deit|deit3)_(tiny|small|base|large)_patch(\d+)_(\d+)(\.[\w.]+)?$")


def timm_config(name: str, num_classes: int = 1000, **overrides: Any) -> ViTConfig:
    """ViTConfig of a timm model name, e.g. "deit_small_patch16_224" -> S/16, exact GELU, LayerNorm eps 1e-6.

    Supported: `vit_*`, `deit_*`, `deit3_*` (LayerScale, pos-emb without cls slot) with size
    tiny/small/base/large, `patchP_RES` and an optional `.tag`; overrides replace any field.
    """
    match = _NAME.match(name)
    if match is None:
        raise ConfigError(
            f"timm model {name!r} not supported; use (vit|deit|deit3)_(tiny|small|base|large)_patchP_RES "
            "(distilled, gap/map-pooled and hybrid models are not)"
        )
    family, size, patch, res = match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
    kw: dict[str, Any] = dict(SIZES[size])
    kw.update(
        patch_size=patch,
        image_size=res,
        posemb_grid=res // patch,
        posemb_cls=family != "deit3",
        layerscale=family == "deit3",
        num_classes=num_classes,
        pool="cls",
        cls_token=True,
        ln_eps=1e-6,
        gelu_approximate=False,
        posemb_interp_offset=0.0,
    )
    kw.update(overrides)
    return ViTConfig(**kw)


def load_timm_vit(path_or_state_dict: str | os.PathLike | Mapping[str, Any], config: ViTConfig) -> Params:
    """Our Flax `params` collection (numpy) from a timm ViT/DeiT checkpoint; strict on keys and shapes.

    Accepts a state dict (numpy or torch values), a `.safetensors` or an `.npz` path. A missing
    `attn.qkv.bias` (timm `qkv_bias=False`) becomes zeros; the checkpoint's `head.*` is dropped when
    `config.num_classes == 0`. Any other missing/unexpected key or wrong shape raises `CheckpointMismatch`.
    """
    c = config
    if not c.cls_token or c.pool != "cls":
        raise ConfigError(
            "load_timm_vit reads timm's cls-token models only; use cls_token=True and pool='cls'"
        )
    sd = load_flat(path_or_state_dict)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    d, h, hd, p, m = c.width, c.num_heads, c.head_dim, c.patch_size, c.mlp_dim
    r = KeyReader(sd, "timm checkpoint")
    n_pos = c.posemb_grid**2 + int(c.posemb_cls)
    dense = lambda k, n_in, n_out: {
        "kernel": r.take(f"{k}.weight", (n_out, n_in)).T,
        "bias": r.take(f"{k}.bias", (n_out,)),
    }
    ln = lambda k: {"scale": r.take(f"{k}.weight", (d,)), "bias": r.take(f"{k}.bias", (d,))}
    params: Params = {
        "embedding": {
            "kernel": r.take("patch_embed.proj.weight", (d, 3, p, p)).transpose(2, 3, 1, 0),
            "bias": r.take("patch_embed.proj.bias", (d,)),
        },
        "pos_embedding": r.take("pos_embed", (1, n_pos, d)),
        "cls": r.take("cls_token", (1, 1, d)),
        "encoder_norm": ln("norm"),
    }
    for i in range(c.depth):
        pre = f"blocks.{i}."
        w = r.take(pre + "attn.qkv.weight", (3 * d, d)).reshape(3, d, d)  # [(q|k|v), out, in]
        key_b = pre + "attn.qkv.bias"
        b = r.take(key_b, (3 * d,)).reshape(3, d) if r.has(key_b) else np.zeros((3, d), np.float32)
        attn = {
            name: {"kernel": w[j].T.reshape(d, h, hd), "bias": b[j].reshape(h, hd)}
            for j, name in enumerate(("query", "key", "value"))
        }
        proj = dense(pre + "attn.proj", d, d)
        attn["out"] = {"kernel": proj["kernel"].reshape(h, hd, d), "bias": proj["bias"]}
        block: Params = {
            "ln1": ln(pre + "norm1"),
            "ln2": ln(pre + "norm2"),
            "attn": attn,
            "mlp": {"fc1": dense(pre + "mlp.fc1", d, m), "fc2": dense(pre + "mlp.fc2", m, d)},
        }
        if c.layerscale:
            block["ls1"] = {"scale": r.take(pre + "ls1.gamma", (d,))}
            block["ls2"] = {"scale": r.take(pre + "ls2.gamma", (d,))}
        params[f"encoderblock_{i}"] = block
    if c.num_classes:
        params["head"] = dense("head", head_features(c), c.num_classes)
    else:
        r.ignore("head.")
    r.finish()
    return params
