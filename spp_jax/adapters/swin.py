"""Swin adapter: mask groups, costs and physical slicing for `spp_jax.models.swin.SwinTransformer`.

Groups: one per stage s and kind, named `stage{s}/{kind}`, of depth = the stage's blocks:
    qk [head_dim], vo [head_dim], mlp [mlp_dim], heads [num_heads] (optional), as the ViT's.
Costs of one entry (per example, at config.image_size; C = stage width, H = heads, hd = head_dim,
n = tokens of the stage's map, N = tokens of the map padded to whole windows (= n unless padded),
T = tokens per window, R = (2w-1)^2 rows of the relative position table):
    qk    2H(C+1) params,            N(2HC + TH) MACs  (W_q, W_k columns; q.k products)
    vo    H(2C+1) params,            N(2HC + TH) MACs  (W_v columns, W_o rows; weights.v products)
    mlp   2C+1 params,               2nC MACs
    heads hd(4C+3) + R params,       N(4 hd C + 2T hd) MACs: one head at full head_dim with its table
          column (an upper bound when qk or vo is also a group, exact alone)
Everything else is the base: patch embedding, merging layers, norms, biases, the relative position tables
(unless "heads" is a group), the head. A block keeps its table while it has heads, even when its
attention branch is gone (no value dim left: it reduces to W_o's bias), so the cost stays linear. With
"vo" but not "qk" a group, W_q and W_k are base cost although a dead branch drops them (vo then declares
an upper bound).
Slicing (algorithm.md §5): keep the columns of W_q, W_k where qk is kept (in every kept head), of W_v where
vo is kept, the matching input rows of W_o, the columns of fc1 and rows of fc2 where mlp is kept; a kept
head keeps its slices of all four and its column of the relative position table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from spp_jax.adapters.base import Order, Params, kept_indices
from spp_jax.adapters.layerwise import Block, LayerwiseAdapter, weight_norm
from spp_jax.errors import CheckpointMismatch
from spp_jax.groups import KeepSet, MaskGroup, MaskSpec
from spp_jax.models.layers import LayerDims
from spp_jax.models.swin import KINDS, SwinConfig, SwinTransformer
from spp_jax.models.swin_attention import window_geometry


def _stage_tokens(c: SwinConfig, side: int) -> tuple[int, int, int]:
    """(tokens n, padded tokens N, window tokens T) of a stage on a side x side map."""
    win, _, padded, _ = window_geometry(side, side, c.window_size, False)
    return side * side, padded * padded, win * win


def _attn_cost(c: SwinConfig, s: int, side: int, h: int, dqk: int, dv: int) -> tuple[int, int]:
    """Params and MACs of a live attention branch's q, k, v and out weights (linear in h*dqk, h*dv)."""
    d = c.dim(s)
    _, big_n, t = _stage_tokens(c, side)
    params = h * dv * (2 * d + 1) + 2 * h * dqk * (d + 1)
    macs = big_n * (2 * d * h * dv + t * h * dv + 2 * d * h * dqk + t * h * dqk)
    return params, macs


def swin_cost(c: SwinConfig, layers: Sequence[LayerDims], linear: bool = False) -> tuple[int, int]:
    """(params, MACs per example) of a Swin with per-block dims `layers`, counted from the shapes.

    `linear`: count q/k/v/out weights for whatever dims are given, even where the branch is dead (the
    base cost of `SwinAdapter.mask_spec`)."""
    p, d0 = c.patch_size, c.embed_dim
    sides = c.sides()
    params = p * p * 3 * d0 + d0 + 2 * d0
    macs = sides[0] ** 2 * p * p * 3 * d0
    n_rel = (2 * c.window_size - 1) ** 2
    for s in range(c.num_stages):
        d = c.dim(s)
        n = sides[s] ** 2
        if s > 0:
            params += 2 * 2 * d + 2 * d * d  # merge norm (4C_prev = 2C) + reduction 2C -> C
            macs += n * 2 * d * d
        for ly in layers[c.first_block(s) : c.first_block(s + 1)]:
            h, dqk, dv, m = ly.num_heads, ly.qk_dim, ly.v_dim, ly.mlp_dim
            params += 6 * d + n_rel * h  # ln1, ln2, W_o and fc2 biases; the position table
            if linear or h * dv > 0:
                ap, am = _attn_cost(c, s, sides[s], h, dqk, dv)
                params, macs = params + ap, macs + am
            if m > 0:
                params += 2 * d * m + m
                macs += 2 * n * d * m
    params += 2 * c.num_features
    if c.num_classes:
        params += c.num_features * c.num_classes + c.num_classes
        macs += c.num_features * c.num_classes
    return params, macs


@dataclasses.dataclass(frozen=True)
class SwinAdapter(LayerwiseAdapter):
    """Adapter for a dense Swin of `config`, pruning the mask kinds in `groups` in every stage."""

    config: SwinConfig
    name: str = "swin"

    GROUPS = KINDS
    config_class = SwinConfig
    module_class = SwinTransformer
    count_cost = staticmethod(swin_cost)

    def _stacks(self) -> list[tuple[str, int]]:
        """The stages: group names `stage{s}/{kind}`."""
        return [(f"stage{s}/", self.config.depths[s]) for s in range(self.config.num_stages)]

    # -- declaration -------------------------------------------------------------------------------
    def mask_spec(self) -> MaskSpec:
        c, g = self.config, set(self.groups)
        sides = c.sides()
        n_rel = (2 * c.window_size - 1) ** 2
        groups = []
        for s, (prefix, depth) in enumerate(self._stacks()):
            d, h, hd, mlp = c.dim(s), c.num_heads[s], c.head_dim(s), c.mlp_dim(s)
            n, big_n, t = _stage_tokens(c, sides[s])
            entries = {
                "qk": (hd, 2 * h * (d + 1), big_n * (2 * h * d + t * h), True),
                "vo": (hd, h * (2 * d + 1), big_n * (2 * h * d + t * h), "qk" in g),
                "mlp": (mlp, 2 * d + 1, n * 2 * d, True),
                "heads": (
                    h,
                    hd * (4 * d + 3) + n_rel,
                    big_n * (4 * hd * d + 2 * t * hd),
                    not g & {"qk", "vo"},
                ),
            }
            for kind in self.groups:
                size, params, macs, exact = entries[kind]
                groups.append(MaskGroup(prefix + kind, depth, size, params, macs, bool(exact)))
        base = []
        for s in range(c.num_stages):
            hd = c.head_dim(s)
            dims = LayerDims(
                0 if "heads" in g else c.num_heads[s],
                0 if "qk" in g else hd,
                0 if "vo" in g else hd,
                0 if "mlp" in g else c.mlp_dim(s),
            )
            base += [dims] * c.depths[s]
        base_params, base_macs = swin_cost(c, base, linear=True)
        return MaskSpec(tuple(groups), float(base_params), float(base_macs))

    def _blocks(self, params: Params) -> list[Block]:
        """(stage, block, block params) of every block, stage-major."""
        out = []
        for s in range(self.config.num_stages):
            for i in range(self.config.depths[s]):
                try:
                    out.append((s, i, params[f"stage_{s}"][f"block_{i}"]))
                except KeyError:
                    raise CheckpointMismatch(
                        f"params have no stage_{s}/block_{i}; "
                        f"they are not a Swin with depths {self.config.depths}"
                    ) from None
        return out

    def entry_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """Per entry, the product of the L2 norms of the two weight slices it owns ([blocks, size]):
        qk j: W_q[:, :, j] and W_k[:, :, j] (all heads); vo j: W_v[:, :, j] and W_o[:, j, :];
        mlp j: fc1[:, j] and fc2[j, :]; heads h: W_v[:, h, :] and W_o[h, :, :]."""

        norm = weight_norm

        def per(s: int, block: Params) -> dict[str, np.ndarray]:
            attn, mlp = block["attn"], block["mlp"]
            v, o = attn["value"]["kernel"], attn["out"]["kernel"]  # [C, H, hd], [H, hd, C]
            return {
                "qk": norm(attn["query"]["kernel"], (0, 1)) * norm(attn["key"]["kernel"], (0, 1)),
                "vo": norm(v, (0, 1)) * norm(o, (0, 2)),
                "mlp": norm(mlp["fc1"]["kernel"], 0) * norm(mlp["fc2"]["kernel"], 1),
                "heads": norm(v, (0, 2)) * norm(o, (1, 2)),
            }

        return self._per_entry(params, per)

    def entry_out_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """Per entry, the L2 norm of the weight slice consuming its masked activation ([blocks, size]):
        qk j: 1 (q_j and k_j only meet each other); vo j: W_o[:, j, :]; mlp j: fc2[j, :]; heads h: W_o[h]."""

        def per(s: int, block: Params) -> dict[str, np.ndarray]:
            o = block["attn"]["out"]["kernel"]
            return {
                "qk": np.ones(self.config.head_dim(s)),
                "vo": weight_norm(o, (0, 2)),
                "mlp": weight_norm(block["mlp"]["fc2"]["kernel"], 1),
                "heads": weight_norm(o, (1, 2)),
            }

        return self._per_entry(params, per)

    # -- slicing -----------------------------------------------------------------------------------
    def _slice_blocks(
        self, params: Params, keep: KeepSet, mvals: dict[str, np.ndarray], order: Order | None,
        src: Sequence[Any],
    ) -> tuple[Params, list[LayerDims]]:  # fmt: skip
        """Every block sliced (`_slice_stage_block`), each stage's other params (patch merging) as they
        are."""
        new = {k: v for k, v in params.items() if not k.startswith("stage_")}
        layers = []
        for s, i, block in self._blocks(params):
            if i == 0:
                new[f"stage_{s}"] = {
                    k: v for k, v in params[f"stage_{s}"].items() if not k.startswith("block_")
                }
            new[f"stage_{s}"][f"block_{i}"], dims = self._slice_stage_block(block, keep, mvals, s, i, order)
            layers.append(dims)
        return new, layers

    def _slice_stage_block(
        self, block: Params, keep: KeepSet, mvals: dict[str, np.ndarray], s: int, i: int,
        order: Order | None,
    ) -> tuple[Params, LayerDims]:  # fmt: skip
        """Block i of stage s: the ViT's slicing (module docstring) plus the kept heads' table columns."""
        c = self.config

        def idx(g: str, size: int) -> np.ndarray:
            return kept_indices(keep, order, f"stage{s}/{g}", i, size)

        def scale(g: str, ix: np.ndarray) -> np.ndarray:
            name = f"stage{s}/{g}"
            return mvals[name][i][ix] if name in mvals else np.ones(len(ix), np.float32)

        heads, qk = idx("heads", c.num_heads[s]), idx("qk", c.head_dim(s))
        vo, mlp = idx("vo", c.head_dim(s)), idx("mlp", c.mlp_dim(s))
        attn = block["attn"]
        new_attn: dict[str, Any] = {"out": {"bias": np.asarray(attn["out"]["bias"])}}
        if len(heads):  # a block keeps its table while it has heads (module docstring)
            table = np.asarray(attn["relative_position_bias_table"])
            new_attn["relative_position_bias_table"] = table[:, heads]
        if len(heads) * len(vo) == 0:
            qk, vo = np.arange(0), np.arange(0)
        else:
            for name, ix, g in (("query", qk, "qk"), ("key", qk, "qk"), ("value", vo, "vo")):
                if len(ix) == 0:
                    continue
                sc = scale(g, ix)
                new_attn[name] = {
                    "kernel": np.asarray(attn[name]["kernel"])[:, heads][:, :, ix] * sc,
                    "bias": np.asarray(attn[name]["bias"])[heads][:, ix] * sc,
                }
            out_k = np.asarray(attn["out"]["kernel"])[heads][:, vo] * scale("heads", heads)[:, None, None]
            new_attn["out"]["kernel"] = out_k
        mlp_p = block["mlp"]
        if len(mlp) == 0:
            new_mlp = {"fc2": {"bias": np.asarray(mlp_p["fc2"]["bias"])}}
        else:
            sc = scale("mlp", mlp)  # the mask sits before the GELU: fold it into fc1
            new_mlp = {
                "fc1": {
                    "kernel": np.asarray(mlp_p["fc1"]["kernel"])[:, mlp] * sc,
                    "bias": np.asarray(mlp_p["fc1"]["bias"])[mlp] * sc,
                },
                "fc2": {
                    "kernel": np.asarray(mlp_p["fc2"]["kernel"])[mlp],
                    "bias": np.asarray(mlp_p["fc2"]["bias"]),
                },
            }
        new_block = {k: v for k, v in block.items() if k not in ("attn", "mlp")}
        new_block["attn"], new_block["mlp"] = new_attn, new_mlp
        return new_block, LayerDims(len(heads), len(qk), len(vo), len(mlp))
