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

from spp_jax.adapters.base import Order, Params, kept_indices
from spp_jax.adapters.layerwise import LayerwiseAdapter, weight_norm
from spp_jax.groups import KeepSet, MaskGroup, MaskSpec
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
class LlamaAdapter(LayerwiseAdapter):
    """Adapter for a dense Llama of `config`, pruning the mask groups named in `groups`."""

    config: LlamaConfig
    name: str = "llama"
    lm: ClassVar[bool] = True  # a causal language model: inputs are tokens [B, L], outputs logits [B, L, V]

    GROUPS = GROUPS
    HEADS = "kv_heads"
    BLOCK = "block_"
    MODEL = "Llama"
    config_class = LlamaConfig
    module_class = Llama
    count_cost = staticmethod(llama_cost)
    layers_to_json = staticmethod(layers_to_json)
    layers_from_json = staticmethod(layers_from_json)

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
        norm = weight_norm

        def per(_: int, block: Params) -> dict[str, np.ndarray]:
            w = self._slices(block)
            return {
                "qk": norm(w["q"], (0, 1, 2)) * norm(w["k"], (0, 1, 2)),
                "vo": norm(w["v"], (0, 1)) * norm(w["o"], (0, 2)),
                "mlp": norm(w["gate"], 0) * norm(w["up"], 0) * norm(w["down"], 1),
                "kv_heads": norm(w["v"], (0, 2)) * norm(w["o_groups"], (1, 2, 3)),
            }

        return self._per_entry(params, per)

    def entry_out_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """Per entry, the L2 norm of the weight slice consuming its masked activation ([depth, size]):
        qk: 1 (q and k only meet each other); vo j: W_o[:, j, :]; mlp j: down[j, :]; kv_heads g: W_o of
        g's query heads."""
        norm = weight_norm

        def per(_: int, block: Params) -> dict[str, np.ndarray]:
            w = self._slices(block)
            return {
                "qk": np.ones(self.config.head_dim // 2),
                "vo": norm(w["o"], (0, 2)),
                "mlp": norm(w["down"], 1),
                "kv_heads": norm(w["o_groups"], (1, 2, 3)),
            }

        return self._per_entry(params, per)

    # -- slicing -----------------------------------------------------------------------------------
    def _slice_block(
        self, block: Params, keep: KeepSet, mvals: dict[str, np.ndarray], i: int, order: Order | None,
        src: LayerDims,
    ) -> tuple[Params, LayerDims]:  # fmt: skip
        """One block's slices; `src.rope_pairs` names the RoPE pair of each of the block's qk columns."""
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
        labels = tuple(int(src.rope_pairs[p]) for p in pairs)
        dims = LayerDims(len(kv) * grp, len(kv), labels, len(vo), len(mlp))
        return new_block, dims
