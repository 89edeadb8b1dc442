"""big_vision (and vit_jax/AugReg) ViT checkpoints: flattened `.npz` with Flax names.

big_vision layout (`params/` prefix optional): `embedding/{kernel [p,p,3,D], bias}`, `pos_embedding`
[1, G*G, D] WITHOUT a cls slot (the cls token is concatenated after the pos-emb add), `cls` [1,1,D] for
pool_type="tok", `Transformer/encoderblock_i/{LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,
out}, LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}}`, `Transformer/encoder_norm`, `head`. Scanned checkpoints
(`Transformer/encoderblock/...` with a leading depth axis) and vit_jax's
`Transformer/posembed_input/pos_embedding` (with a cls slot: use posemb_cls=True) are read too.
big_vision's MLP uses flax's default `nn.gelu`, the TANH approximation: `big_vision_config` sets it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from spp_jax.errors import ConfigError
from spp_jax.importers._common import KeyReader, Params, head_features, load_flat
from spp_jax.models.vit import ViTConfig, vit_config


def big_vision_config(variant: str = "S/16", **overrides: Any) -> ViTConfig:
    """ViTConfig of a big_vision ViT: pos-emb without cls slot, tanh GELU, eps 1e-6, cls-token pooling."""
    kw: dict[str, Any] = dict(posemb_cls=False, gelu_approximate=True, ln_eps=1e-6, posemb_interp_offset=0.0)
    kw.update(overrides)
    return vit_config(variant, **kw)


def _unscan(flat: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """Split scanned `Transformer/encoderblock/...` arrays [depth, ...] into per-layer keys."""
    scanned = "Transformer/encoderblock/"
    out = {}
    for k, v in flat.items():
        if k.startswith(scanned):
            if v.shape[:1] != (depth,):
                continue  # left as is: KeyReader reports it as unexpected
            for i in range(depth):
                out[f"Transformer/encoderblock_{i}/{k[len(scanned) :]}"] = v[i]
        else:
            out[k] = v
    return out


def load_big_vision_npz(path: str | os.PathLike | Mapping[str, Any], config: ViTConfig) -> Params:
    """Our Flax `params` collection (numpy) from a big_vision ViT `.npz` (or flat dict); strict on keys.

    The checkpoint's `head/*` is dropped when `config.num_classes == 0`. Missing/unexpected keys (e.g.
    `pre_logits`, `MAPHead_0`) and wrong shapes raise `CheckpointMismatch`.
    """
    c = config
    if c.layerscale:
        raise ConfigError("big_vision ViTs have no LayerScale; set layerscale=False")
    flat = {k.removeprefix("params/"): v for k, v in load_flat(path).items()}
    flat = _unscan(flat, c.depth)
    d, h, hd, p, m = c.width, c.num_heads, c.head_dim, c.patch_size, c.mlp_dim
    r = KeyReader(flat, "big_vision checkpoint")
    dense = lambda k, shape, bias: {"kernel": r.take(f"{k}/kernel", shape), "bias": r.take(f"{k}/bias", bias)}
    ln = lambda k: {"scale": r.take(f"{k}/scale", (d,)), "bias": r.take(f"{k}/bias", (d,))}
    n_pos = c.posemb_grid**2 + int(c.posemb_cls and c.cls_token)
    pos_key = (
        "Transformer/posembed_input/pos_embedding"
        if r.has("Transformer/posembed_input/pos_embedding")
        else "pos_embedding"
    )
    params: Params = {
        "embedding": dense("embedding", (p, p, 3, d), (d,)),
        "pos_embedding": r.take(pos_key, (1, n_pos, d)),
        "encoder_norm": ln("Transformer/encoder_norm"),
    }
    if c.cls_token:
        params["cls"] = r.take("cls", (1, 1, d))
    elif c.pool != "gap":
        raise ConfigError(
            "a big_vision model without cls token has nothing to pool but tokens; set pool='gap'"
        )
    for i in range(c.depth):
        pre = f"Transformer/encoderblock_{i}/"
        mha = pre + "MultiHeadDotProductAttention_0/"
        attn = {k: dense(mha + k, (d, h, hd), (h, hd)) for k in ("query", "key", "value")}
        attn["out"] = dense(mha + "out", (h, hd, d), (d,))
        params[f"encoderblock_{i}"] = {
            "ln1": ln(pre + "LayerNorm_0"),
            "ln2": ln(pre + "LayerNorm_1"),
            "attn": attn,
            "mlp": {
                "fc1": dense(pre + "MlpBlock_0/Dense_0", (d, m), (m,)),
                "fc2": dense(pre + "MlpBlock_0/Dense_1", (m, d), (d,)),
            },
        }
    if c.num_classes:
        params["head"] = dense("head", (head_features(c), c.num_classes), (c.num_classes,))
    else:
        r.ignore("head/")
    r.finish()
    return params
