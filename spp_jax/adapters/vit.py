"""ViT adapter: mask groups, costs and physical slicing for `spp_jax.models.vit.VisionTransformer`.

Costs (algorithm.md §2; D = width, H = heads, N = tokens, per example):
    qk    entry: 2H(D+1) params, N(2HD + NH) MACs
    vo    entry: H(2D+1) params, N(2HD + NH) MACs
    mlp   entry: 2D+1 params,    N 2D MACs
    heads entry: cost of one head at full head_dim (an upper bound: it overlaps qk/vo entries)
Slicing (algorithm.md §5): keep the columns of W_q, W_k where qk is kept (in every kept head), of W_v where
vo is kept, the matching input rows of W_o, the columns of fc1 and rows of fc2 where mlp is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spp_jax.adapters.base import ArchSpec, Order, Params, kept_indices, register_adapter
from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.groups import KeepSet, MaskGroup, Masks, MaskSpec
from spp_jax.models.vit import (
    LayerDims,
    VisionTransformer,
    ViTConfig,
    layers_from_json,
    layers_to_json,
)

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


@dataclasses.dataclass(frozen=True)
class ViTAdapter:
    """Adapter for a dense ViT of `config`, pruning the mask groups named in `groups`."""

    config: ViTConfig
    groups: tuple[str, ...] = ("qk", "vo", "mlp")
    name: str = "vit"

    def __post_init__(self):
        bad = [g for g in self.groups if g not in GROUPS]
        if bad or not self.groups:
            raise ConfigError(
                f"mask groups {list(self.groups)} are not a non-empty subset of {GROUPS}; choose from those"
            )

    # -- declaration -------------------------------------------------------------------------------
    def mask_spec(self) -> MaskSpec:
        c = self.config
        cost = lambda layers: vit_cost(c, layers)
        return encoder_mask_spec(
            self.groups, c.depth, c.width, c.num_heads, c.head_dim, c.mlp_dim, c.num_tokens, cost
        )

    def dense_spec(self) -> ArchSpec:
        return self._arch_spec(self.config.dense_layers())

    def module(self, arch_spec: ArchSpec | None = None) -> VisionTransformer:
        if arch_spec is None:
            return VisionTransformer(self.config)
        return VisionTransformer(
            ViTConfig.from_json(arch_spec["config"]), layers_from_json(arch_spec["layers"])
        )

    def arch_cost(self, arch_spec: ArchSpec) -> tuple[int, int]:
        return vit_cost(ViTConfig.from_json(arch_spec["config"]), layers_from_json(arch_spec["layers"]))

    def _arch_spec(self, layers: Sequence[LayerDims]) -> ArchSpec:
        return {
            "arch": self.name,
            "config": self.config.to_json(),
            "groups": list(self.groups),
            "layers": layers_to_json(layers),
        }

    def entry_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """Per entry, the product of the L2 norms of the two weight slices it owns ([depth, size]):
        qk j: W_q[:, :, j] and W_k[:, :, j] (all heads); vo j: W_v[:, :, j] and W_o[:, j, :];
        mlp j: fc1[:, j] and fc2[j, :]; heads h: W_v[:, h, :] and W_o[h, :, :]."""
        norm = lambda w, axes: np.sqrt(np.square(np.asarray(w, np.float64)).sum(axis=axes))
        rows: dict[str, list[np.ndarray]] = {g: [] for g in self.groups}
        for i in range(self.config.depth):
            attn, mlp = params[f"encoderblock_{i}"]["attn"], params[f"encoderblock_{i}"]["mlp"]
            v, o = attn["value"]["kernel"], attn["out"]["kernel"]  # [D, H, hd], [H, hd, D]
            per = {
                "qk": (attn["query"]["kernel"], (0, 1), attn["key"]["kernel"], (0, 1)),
                "vo": (v, (0, 1), o, (0, 2)),
                "mlp": (mlp["fc1"]["kernel"], 0, mlp["fc2"]["kernel"], 1),
                "heads": (v, (0, 2), o, (1, 2)),
            }
            for g in self.groups:
                a, a_axes, b, b_axes = per[g]
                rows[g].append(norm(a, a_axes) * norm(b, b_axes))
        return {g: np.stack(r).astype(np.float32) for g, r in rows.items()}

    def entry_out_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """Per entry, the L2 norm of the weight slice consuming its masked activation ([depth, size]):
        qk j: 1 (q_j and k_j only meet each other); vo j: W_o[:, j, :] (all heads); mlp j: fc2[j, :];
        heads h: W_o[h, :, :]."""
        norm = lambda w, axes: np.sqrt(np.square(np.asarray(w, np.float64)).sum(axis=axes))
        rows: dict[str, list[np.ndarray]] = {g: [] for g in self.groups}
        for i in range(self.config.depth):
            block = params[f"encoderblock_{i}"]
            o = block["attn"]["out"]["kernel"]  # [H, hd, D]
            per = {
                "qk": np.ones(self.config.head_dim),
                "vo": norm(o, (0, 2)),
                "mlp": norm(block["mlp"]["fc2"]["kernel"], 1),
                "heads": norm(o, (1, 2)),
            }
            for g in self.groups:
                rows[g].append(per[g])
        return {g: np.stack(r).astype(np.float32) for g, r in rows.items()}

    # -- slicing -----------------------------------------------------------------------------------
    def normalize_keep(self, keep: KeepSet) -> KeepSet:
        """Drop entries that no longer affect the function: qk (and vo) of a layer whose attention
        branch is gone (no vo dim or no head left). Declared cost of the result == `arch_cost`."""
        c = self.config
        spec = self.mask_spec()
        spec.check_masks(keep)
        out = {g: np.asarray(keep[g], bool).copy() for g in self.groups}
        vo = out.get("vo", np.ones((c.depth, c.head_dim), bool))
        heads = out.get("heads", np.ones((c.depth, c.num_heads), bool))
        dead = ~vo.any(axis=1) | ~heads.any(axis=1)
        for g in ("qk", "vo", "heads"):
            if g in out:
                out[g][dead] = False
        return out

    def extract(
        self,
        params: Params,
        keep: KeepSet,
        masks: Masks | None = None,
        fold_masks: bool = False,
        *,
        order: Order | None = None,
        source: ArchSpec | None = None,
    ) -> tuple[Params, ArchSpec]:
        """Slice the dense `params` to the keep-set (algorithm.md §5).

        Kept entries are reset to mask 1 (reference behaviour) unless `fold_masks`, which multiplies the
        continuous mask values of `masks` into the kept weights, so the result equals the model run with
        masks * keep. Returns (params, arch spec); `module(arch_spec)` runs them.
        """
        c = self.config
        if fold_masks and masks is None:
            raise ConfigError("fold_masks=True needs the mask values (masks=...)")
        keep = self.normalize_keep(keep)
        mvals = {g: np.asarray(masks[g], np.float32) for g in self.groups} if fold_masks else {}
        new = {k: v for k, v in params.items() if not k.startswith("encoderblock_")}
        layers = []
        for i in range(c.depth):
            name = f"encoderblock_{i}"
            if name not in params:
                raise CheckpointMismatch(f"params have no {name}; they are not a depth-{c.depth} ViT")
            block, dims = self._slice_block(params[name], keep, mvals, i, order)
            new[name] = block
            layers.append(dims)
        return new, self._arch_spec(layers)

    def _slice_block(
        self, block: Params, keep: KeepSet, mvals: dict[str, np.ndarray], i: int, order: Order | None
    ) -> tuple[Params, LayerDims]:
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


def _from_spec(arch_spec: ArchSpec) -> ViTAdapter:
    return ViTAdapter(ViTConfig.from_json(arch_spec["config"]), tuple(arch_spec["groups"]))


register_adapter("vit", _from_spec)
