"""ViT adapter: mask groups, costs and physical slicing for `spp_jax.models.vit.VisionTransformer`.

Costs (algorithm.md §2; D = width, H = heads, N = tokens, per example):
    qk    entry: 2H(D+1) params, N(2HD + NH) MACs
    vo    entry: H(2D+1) params, N(2HD + NH) MACs
    mlp   entry: 2D+1 params,    N 2D MACs
    heads entry: cost of one head at full head_dim (an upper bound: it overlaps qk/vo entries)
Slicing (algorithm.md §5): keep the columns of W_q, W_k where qk is kept (in every kept head), of W_v where
vo is kept, the matching input rows of W_o, the columns of fc1 and rows of fc2 where mlp is kept.
`EncoderAdapter` is all of it but the config, the module and the cost count: what ViT and BERT
(spp_jax.adapters.bert) share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spp_jax.adapters.base import Order, Params, kept_indices
from spp_jax.adapters.layerwise import LayerwiseAdapter, weight_norm
from spp_jax.groups import KeepSet, MaskGroup, MaskSpec
from spp_jax.models.layers import LayerDims
from spp_jax.models.vit import VisionTransformer, ViTConfig

GROUPS = ("qk", "vo", "mlp", "heads")


def blocks_cost(d: int, n: int, layers: Sequence[LayerDims], layerscale: bool = False) -> tuple[int, int]:
    """(params, MACs per example) of the transformer blocks (attention + MLP, two norms each) of width `d`
    with the given per-layer dims on `n` tokens, counted from the shapes (ViT, BERT and CLIP towers)."""
    params = macs = 0
    for ly in layers:
        h, dqk, dv, m = ly.num_heads, ly.qk_dim, ly.v_dim, ly.mlp_dim
        params += 4 * d + (2 * d if layerscale else 0)  # ln1, ln2 (+ ls1, ls2)
        params += d  # W_o bias (kept even when the attention branch is gone)
        if h * dv > 0:
            params += h * dv * (d + 1) + h * dv * d
            macs += 2 * n * d * h * dv + n * n * h * dv
            if dqk > 0:
                params += 2 * h * dqk * (d + 1)
                macs += 2 * n * d * h * dqk + n * n * h * dqk
        params += d  # fc2 bias
        if m > 0:
            params += d * m + m + m * d
            macs += 2 * n * d * m
    return params, macs


def encoder_mask_spec(
    groups: Sequence[str], depth: int, d: int, h: int, hd: int, mlp_dim: int, n: int,
    cost: Callable[[Sequence[LayerDims]], tuple[int, int]],
) -> MaskSpec:  # fmt: skip
    """The mask spec of a stack of `depth` ViT-layout blocks (width d, h heads of hd dims, MLP mlp_dim, n
    tokens) pruning `groups`; `cost(layers)` counts the whole model at the given per-layer dims (the base:
    what no group removes). Per-entry costs in the module docstring."""
    entries = {
        "qk": (hd, 2 * h * (d + 1), n * (2 * h * d + n * h), True),
        "vo": (hd, h * (2 * d + 1), n * (2 * h * d + n * h), True),
        "mlp": (mlp_dim, 2 * d + 1, n * 2 * d, True),
        "heads": (h, hd * (2 * (d + 1) + 2 * d + 1), n * (4 * hd * d + 2 * n * hd), False),
    }
    out = tuple(MaskGroup(g, depth, *entries[g]) for g in groups)
    g = set(groups)
    base_layer = LayerDims(
        0 if "heads" in g else h,
        0 if "qk" in g else hd,
        0 if "vo" in g else hd,
        0 if "mlp" in g else mlp_dim,
    )
    base_params, base_macs = cost([base_layer] * depth)
    if "vo" in g and not g & {"qk", "heads"}:
        # W_q, W_k are not a group but live only while a value dim does: count them in the base, so
        # the declared cost is an upper bound (exact whenever no layer loses all of its vo entries).
        base_params += depth * 2 * h * hd * (d + 1)
        base_macs += depth * n * (2 * h * d * hd + n * h * hd)
        out = tuple(dataclasses.replace(x, exact_cost=x.name != "vo") for x in out)
    if "heads" in g and not g & {"qk", "vo"}:
        # heads alone: a head's cost is exact, the base is the model without any head.
        out = tuple(dataclasses.replace(x, exact_cost=True) for x in out)
    return MaskSpec(out, float(base_params), float(base_macs))


def vit_cost(config: ViTConfig, layers: Sequence[LayerDims]) -> tuple[int, int]:
    """(params, MACs per example) of a ViT with the given per-layer dims, counted from the shapes."""
    c = config
    d, n, p = c.width, c.num_tokens, c.patch_size
    n_patches = (c.image_size // p) ** 2
    n_pos = c.posemb_grid**2 + int(c.posemb_cls and c.cls_token)
    params = p * p * 3 * d + int(c.patch_bias) * d + n_pos * d + int(c.cls_token) * d
    params += 2 * d if c.ln_pre else 0
    macs = n_patches * p * p * 3 * d
    block_params, block_macs = blocks_cost(d, n, layers, c.layerscale)
    params, macs = params + block_params, macs + block_macs
    feat = 2 * d if c.pool == "cls+gap" else d
    params += 2 * d  # encoder_norm
    if c.num_classes:
        params += feat * c.num_classes + c.num_classes
        macs += feat * c.num_classes
    return params, macs


class EncoderAdapter(LayerwiseAdapter):
    """The adapters of ViT-layout encoders (ViT, BERT): blocks `encoderblock_{i}` with `attn` and `mlp`
    (`spp_jax.models.layers.MaskedAttention`, `MaskedMlp`), groups declared by `encoder_mask_spec` at
    `_tokens()` tokens, the weight norms and slicing of those blocks. They read only config.{depth, width,
    num_heads, head_dim, mlp_dim, mlp_mask_pre_act}."""

    GROUPS = GROUPS
    BLOCK = "encoderblock_"
    MODEL = "ViT"

    def _tokens(self) -> int:
        """The tokens per example the MACs are counted at."""
        raise NotImplementedError

    # -- declaration -------------------------------------------------------------------------------
    def mask_spec(self) -> MaskSpec:
        c = self.config
        cost = lambda layers: self.count_cost(c, layers)
        return encoder_mask_spec(
            self.groups, c.depth, c.width, c.num_heads, c.head_dim, c.mlp_dim, self._tokens(), cost
        )

    def entry_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """Per entry, the product of the L2 norms of the two weight slices it owns ([depth, size]):
        qk j: W_q[:, :, j] and W_k[:, :, j] (all heads); vo j: W_v[:, :, j] and W_o[:, j, :];
        mlp j: fc1[:, j] and fc2[j, :]; heads h: W_v[:, h, :] and W_o[h, :, :]."""

        def per(_: int, block: Params) -> dict[str, np.ndarray]:
            attn, mlp = block["attn"], block["mlp"]
            v, o = attn["value"]["kernel"], attn["out"]["kernel"]  # [D, H, hd], [H, hd, D]
            pairs = {
                "qk": (attn["query"]["kernel"], (0, 1), attn["key"]["kernel"], (0, 1)),
                "vo": (v, (0, 1), o, (0, 2)),
                "mlp": (mlp["fc1"]["kernel"], 0, mlp["fc2"]["kernel"], 1),
                "heads": (v, (0, 2), o, (1, 2)),
            }
            norms = lambda a, a_axes, b, b_axes: weight_norm(a, a_axes) * weight_norm(b, b_axes)
            return {g: norms(*pairs[g]) for g in self.groups}

        return self._per_entry(params, per)

    def entry_out_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """Per entry, the L2 norm of the weight slice consuming its masked activation ([depth, size]):
        qk j: 1 (q_j and k_j only meet each other); vo j: W_o[:, j, :] (all heads); mlp j: fc2[j, :];
        heads h: W_o[h, :, :]."""

        def per(_: int, block: Params) -> dict[str, np.ndarray]:
            o = block["attn"]["out"]["kernel"]  # [H, hd, D]
            return {
                "qk": np.ones(self.config.head_dim),
                "vo": weight_norm(o, (0, 2)),
                "mlp": weight_norm(block["mlp"]["fc2"]["kernel"], 1),
                "heads": weight_norm(o, (1, 2)),
            }

        return self._per_entry(params, per)

    # -- slicing -----------------------------------------------------------------------------------
    def _slice_block(
        self, block: Params, keep: KeepSet, mvals: dict[str, np.ndarray], i: int, order: Order | None,
        src: LayerDims,
    ) -> tuple[Params, LayerDims]:  # fmt: skip
        """Keep the columns of W_q, W_k where qk is kept (in every kept head), of W_v where vo is kept, the
        matching input rows of W_o, the columns of fc1 and rows of fc2 where mlp is kept."""
        c = self.config

        def idx(g: str, size: int) -> np.ndarray:
            return kept_indices(keep, order, g, i, size)

        def scale(g: str, ix: np.ndarray) -> np.ndarray:
            return mvals[g][i][ix] if g in mvals else np.ones(len(ix), np.float32)

        heads, qk = idx("heads", c.num_heads), idx("qk", c.head_dim)
        vo, mlp = idx("vo", c.head_dim), idx("mlp", c.mlp_dim)
        attn = block["attn"]
        new_attn: dict[str, Any] = {}
        if len(heads) * len(vo) == 0:
            qk = np.arange(0)
            new_attn["out"] = {"bias": np.asarray(attn["out"]["bias"])}
        else:
            for name, ix, g in (("query", qk, "qk"), ("key", qk, "qk"), ("value", vo, "vo")):
                if len(ix) == 0:
                    continue
                s = scale(g, ix)
                new_attn[name] = {
                    "kernel": np.asarray(attn[name]["kernel"])[:, heads][:, :, ix] * s,
                    "bias": np.asarray(attn[name]["bias"])[heads][:, ix] * s,
                }
            out_k = np.asarray(attn["out"]["kernel"])[heads][:, vo]
            out_k = out_k * scale("heads", heads)[:, None, None]
            new_attn["out"] = {"kernel": out_k, "bias": np.asarray(attn["out"]["bias"])}
        mlp_p = block["mlp"]
        if len(mlp) == 0:
            new_mlp = {"fc2": {"bias": np.asarray(mlp_p["fc2"]["bias"])}}
        else:
            s = scale("mlp", mlp)
            pre = c.mlp_mask_pre_act
            new_mlp = {
                "fc1": {
                    "kernel": np.asarray(mlp_p["fc1"]["kernel"])[:, mlp] * (s if pre else 1.0),
                    "bias": np.asarray(mlp_p["fc1"]["bias"])[mlp] * (s if pre else 1.0),
                },
                "fc2": {
                    "kernel": np.asarray(mlp_p["fc2"]["kernel"])[mlp] * (1.0 if pre else s[:, None]),
                    "bias": np.asarray(mlp_p["fc2"]["bias"]),
                },
            }
        new_block = {k: v for k, v in block.items() if k not in ("attn", "mlp")}
        new_block["attn"], new_block["mlp"] = new_attn, new_mlp
        n_heads = len(heads) if len(vo) else 0
        return new_block, LayerDims(n_heads, len(qk), len(vo) if n_heads else 0, len(mlp))


@dataclasses.dataclass(frozen=True)
class ViTAdapter(EncoderAdapter):
    """Adapter for a dense ViT of `config`, pruning the mask groups named in `groups`."""

    config: ViTConfig
    name: str = "vit"

    config_class = ViTConfig
    module_class = VisionTransformer
    count_cost = staticmethod(vit_cost)

    def _tokens(self) -> int:
        return self.config.num_tokens
