"""Llama adapter: mask groups, costs and physical slicing for `spp_jax.models.llama.Llama`.

Costs, per token (D = width, H = query heads, KV = kv heads, G = H / KV, hd = head_dim, F = mlp_dim,
V = vocab, N = `config.cost_seq_len`). MACs are one forward pass of an N-token sequence divided by N: a
projection costs one MAC per weight; causal attention has N(N+1)/2 query-key pairs, so each query attends to
a = (N+1)/2 keys on average (scores q.k and the weighted sum of v each cost a MACs per head-dim per token).
    qk       entry (one RoPE pair, 2 dims): 2D(H+KV) params, 2D(H+KV) + H(N+1) MACs
    vo       entry (1 value dim):           D(H+KV) params,  D(H+KV) + H(N+1)/2 MACs
    mlp      entry (1 neuron):              3D params,       3D MACs
    kv_heads entry (1 kv group, all dims):  2D hd(G+1) params, 2D hd(G+1) + G hd(N+1) MACs (an upper bound
             with qk/vo: it overlaps their entries, exact_cost=False as the ViT's "heads")
    base: embedding VD (+ lm_head VD when untied) + norms (2 depth + 1) D params; lm_head VD MACs (tied or
          not); the embedding lookup and elementwise ops (norms, RoPE, SiLU, softmax) cost no MACs.
`arch_cost` counts the same formulas from the per-layer shapes (`llama_cost`), so a normalized keep-set's
declared cost equals the extracted model's, and its params equal the leaves of the extracted tree.
Slicing: q/k columns of the kept pairs ([first halves, second halves]) of kept heads, v columns and W_o rows
of kept value dims, gate/up columns and down rows of kept neurons; a dropped kv group takes its k/v head
and its G query heads (and their W_o rows) with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from spp_jax.adapters.base import ArchSpec, Order, Params, kept_indices, register_adapter
from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.groups import KeepSet, MaskGroup, Masks, MaskSpec
from spp_jax.models.llama import LayerDims, Llama, LlamaConfig, layers_from_json, layers_to_json

GROUPS = ("qk", "vo", "mlp", "kv_heads")


def llama_cost(config: LlamaConfig, layers: Sequence[LayerDims]) -> tuple[int, float]:
    """(params, MACs per token at context `config.cost_seq_len`) of a Llama with the given per-layer dims,
    counted from the shapes (module docstring)."""
    c = config
    d, a = c.width, (c.cost_seq_len + 1) / 2
    params = c.vocab_size * d * (1 if c.tie_embeddings else 2) + d  # embed (+ lm_head), final_norm
    macs = float(c.vocab_size * d)
    for ly in layers:
        h, kv, qk, dv, m = ly.num_heads, ly.num_kv_heads, ly.qk_dim, ly.v_dim, ly.mlp_dim
        proj = d * (qk + dv) * (h + kv) + 3 * d * m
        params += 2 * d + proj
        macs += proj + h * (qk + dv) * a
    return params, macs


@dataclasses.dataclass(frozen=True)
class LlamaAdapter:
    """Adapter for a dense Llama of `config`, pruning the mask groups named in `groups`."""

    config: LlamaConfig
    groups: tuple[str, ...] = ("qk", "vo", "mlp")
    name: str = "llama"
    lm: ClassVar[bool] = True  # a causal language model: inputs are tokens [B, L], outputs logits [B, L, V]

    def __post_init__(self):
        bad = [g for g in self.groups if g not in GROUPS]
        if bad or not self.groups or len(set(self.groups)) != len(self.groups):
            raise ConfigError(
                f"mask groups {list(self.groups)} are not a non-empty subset of {GROUPS}; choose from those"
            )

    # -- declaration -------------------------------------------------------------------------------
    def mask_spec(self) -> MaskSpec:
        c = self.config
        d, h, kv, g, hd, n = c.width, c.num_heads, c.num_kv_heads, c.group_size, c.head_dim, c.cost_seq_len
        entries = {
            "qk": (hd // 2, 2 * d * (h + kv), 2 * d * (h + kv) + h * (n + 1), True),
            "vo": (hd, d * (h + kv), d * (h + kv) + h * (n + 1) / 2, True),
            "mlp": (c.mlp_dim, 3 * d, 3 * d, True),
            "kv_heads": (kv, 2 * d * hd * (g + 1), 2 * d * hd * (g + 1) + g * hd * (n + 1), False),
        }
        groups = tuple(MaskGroup(x, c.depth, *entries[x]) for x in self.groups)
        gs = set(self.groups)
        base_layer = LayerDims(
            0 if "kv_heads" in gs else h,
            0 if "kv_heads" in gs else kv,
            () if "qk" in gs else tuple(range(hd // 2)),
            0 if "vo" in gs else hd,
            0 if "mlp" in gs else c.mlp_dim,
        )
        base_params, base_macs = llama_cost(c, [base_layer] * c.depth)
        if "kv_heads" in gs and not ({"qk", "vo"} & gs):
            groups = tuple(dataclasses.replace(x, exact_cost=True) for x in groups)
        return MaskSpec(groups, float(base_params), float(base_macs))

    def dense_spec(self) -> ArchSpec:
        return self._arch_spec(self.config.dense_layers())

    def module(self, arch_spec: ArchSpec | None = None) -> Llama:
        if arch_spec is None:
            return Llama(self.config)
        return Llama(LlamaConfig.from_json(arch_spec["config"]), layers_from_json(arch_spec["layers"]))

    def arch_cost(self, arch_spec: ArchSpec) -> tuple[int, float]:
        return llama_cost(LlamaConfig.from_json(arch_spec["config"]), layers_from_json(arch_spec["layers"]))

    def _arch_spec(self, layers: Sequence[LayerDims]) -> ArchSpec:
        return {
            "arch": self.name,
            "config": self.config.to_json(),
            "groups": list(self.groups),
            "layers": layers_to_json(layers),
        }

    # -- baselines ---------------------------------------------------------------------------------
    def _slices(self, block: Params) -> dict[str, np.ndarray]:
        c = self.config
        f64 = lambda w: np.asarray(w, np.float64)
        attn, mlp = block["attn"], block["mlp"]
        pairs = lambda w: f64(w).reshape(*w.shape[:-1], 2, c.head_dim // 2)  # [..., 2, hd/2]
        o = f64(attn["out"]["kernel"])  # [H, hd, D]
        return {
            "q": pairs(attn["query"]["kernel"]),
            "k": pairs(attn["key"]["kernel"]),
            "v": f64(attn["value"]["kernel"]),  # [D, KV, hd]
            "o": o,
            "o_groups": o.reshape(c.num_kv_heads, c.group_size, *o.shape[1:]),  # [KV, G, hd, D]
            "gate": f64(mlp["gate"]["kernel"]),
            "up": f64(mlp["up"]["kernel"]),
            "down": f64(mlp["down"]["kernel"]),
        }

    def entry_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """Per entry, the product of the L2 norms of the weight slices it owns ([depth, size]):
        qk j: W_q and W_k at dims {j, j + hd/2} (all heads); vo j: W_v[:, :, j] and W_o[:, j, :];
        mlp j: gate[:, j], up[:, j] and down[j, :]; kv_heads g: W_v[:, g, :] and W_o of g's query heads."""
        norm = lambda w, axes: np.sqrt(np.square(w).sum(axis=axes))
        rows: dict[str, list[np.ndarray]] = {g: [] for g in self.groups}
        for i in range(self.config.depth):
            w = self._slices(params[f"block_{i}"])
            per = {
                "qk": norm(w["q"], (0, 1, 2)) * norm(w["k"], (0, 1, 2)),
                "vo": norm(w["v"], (0, 1)) * norm(w["o"], (0, 2)),
                "mlp": norm(w["gate"], 0) * norm(w["up"], 0) * norm(w["down"], 1),
                "kv_heads": norm(w["v"], (0, 2)) * norm(w["o_groups"], (1, 2, 3)),
            }
            for g in self.groups:
                rows[g].append(per[g])
        return {g: np.stack(r).astype(np.float32) for g, r in rows.items()}

    def entry_out_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """Per entry, the L2 norm of the weight slice consuming its masked activation ([depth, size]):
        qk: 1 (q and k only meet each other); vo j: W_o[:, j, :]; mlp j: down[j, :]; kv_heads g: W_o of
        g's query heads."""
        norm = lambda w, axes: np.sqrt(np.square(w).sum(axis=axes))
        rows: dict[str, list[np.ndarray]] = {g: [] for g in self.groups}
        for i in range(self.config.depth):
            w = self._slices(params[f"block_{i}"])
            per = {
                "qk": np.ones(self.config.head_dim // 2),
                "vo": norm(w["o"], (0, 2)),
                "mlp": norm(w["down"], 1),
                "kv_heads": norm(w["o_groups"], (1, 2, 3)),
            }
            for g in self.groups:
                rows[g].append(per[g])
        return {g: np.stack(r).astype(np.float32) for g, r in rows.items()}

    # -- slicing -----------------------------------------------------------------------------------
    def normalize_keep(self, keep: KeepSet) -> KeepSet:
        """Drop entries that no longer affect the function: qk, vo and kv_heads of a layer whose attention
        branch is gone (no value dim or no kv group left). Declared cost of the result == `arch_cost`."""
        c = self.config
        self.mask_spec().check_masks(keep)
        out = {g: np.asarray(keep[g], bool).copy() for g in self.groups}
        vo = out.get("vo", np.ones((c.depth, c.head_dim), bool))
        kv = out.get("kv_heads", np.ones((c.depth, c.num_kv_heads), bool))
        dead = ~vo.any(axis=1) | ~kv.any(axis=1)
        for g in ("qk", "vo", "kv_heads"):
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
        """Slice the dense `params` to the keep-set. Kept entries are reset to mask 1 unless `fold_masks`,
        which multiplies the continuous values of `masks` into the kept weights, so the result equals the
        model run with masks * keep. Returns (params, arch spec); `module(arch_spec)` runs them."""
        c = self.config
        if fold_masks and masks is None:
            raise ConfigError("fold_masks=True needs the mask values (masks=...)")
        keep = self.normalize_keep(keep)
        mvals = {g: np.asarray(masks[g], np.float32) for g in self.groups} if fold_masks else {}
        new = {k: v for k, v in params.items() if not k.startswith("block_")}
        src = layers_from_json(source["layers"]) if source is not None else c.dense_layers()
        layers = []
        for i in range(c.depth):
            name = f"block_{i}"
            if name not in params:
                raise CheckpointMismatch(f"params have no {name}; they are not a depth-{c.depth} Llama")
            new[name], dims = self._slice_block(params[name], keep, mvals, i, order, src[i].rope_pairs)
            layers.append(dims)
        return new, self._arch_spec(layers)

    def _slice_block(
        self, block: Params, keep: KeepSet, mvals: dict[str, np.ndarray], i: int, order: Order | None,
        rope_pairs: Sequence[int],
    ) -> tuple[Params, LayerDims]:  # fmt: skip
        """One block's slices; `rope_pairs` names the RoPE pair of each of the block's qk columns."""
        c = self.config
        half, grp = c.head_dim // 2, c.group_size

        def idx(g: str, size: int) -> np.ndarray:
            return kept_indices(keep, order, g, i, size)

        def scale(g: str, ix: np.ndarray) -> np.ndarray:
            return mvals[g][i][ix] if g in mvals else np.ones(len(ix), np.float32)

        kv, pairs = idx("kv_heads", c.num_kv_heads), idx("qk", half)
        vo, mlp = idx("vo", c.head_dim), idx("mlp", c.mlp_dim)
        new_block: Params = {k: {"scale": np.asarray(block[k]["scale"])} for k in ("attn_norm", "mlp_norm")}
        if len(kv) * len(vo) == 0:
            kv = pairs = vo = np.arange(0)
        else:
            attn = {k: np.asarray(v["kernel"]) for k, v in block["attn"].items()}
            heads = (kv[:, None] * grp + np.arange(grp)[None, :]).reshape(-1)
            new_attn = {}
            if len(pairs):
                dims = np.concatenate([pairs, pairs + half])
                s = np.tile(scale("qk", pairs), 2)
                new_attn["query"] = {"kernel": attn["query"][:, heads][:, :, dims] * s}
                new_attn["key"] = {"kernel": attn["key"][:, kv][:, :, dims] * s}
            new_attn["value"] = {"kernel": attn["value"][:, kv][:, :, vo] * scale("vo", vo)}
            head_scale = np.repeat(scale("kv_heads", kv), grp)
            new_attn["out"] = {"kernel": attn["out"][heads][:, vo] * head_scale[:, None, None]}
            new_block["attn"] = new_attn
        if len(mlp):
            w = {k: np.asarray(v["kernel"]) for k, v in block["mlp"].items()}
            new_block["mlp"] = {
                "gate": {"kernel": w["gate"][:, mlp]},
                "up": {"kernel": w["up"][:, mlp] * scale("mlp", mlp)},
                "down": {"kernel": w["down"][mlp]},
            }
        labels = tuple(int(rope_pairs[p]) for p in pairs)
        dims = LayerDims(len(kv) * grp, len(kv), labels, len(vo), len(mlp))
        return new_block, dims


def _from_spec(arch_spec: ArchSpec) -> LlamaAdapter:
    return LlamaAdapter(LlamaConfig.from_json(arch_spec["config"]), tuple(arch_spec["groups"]))


register_adapter("llama", _from_spec)
