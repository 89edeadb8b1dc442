"""BERT adapter: mask groups, costs and physical slicing for `spp_jax.models.bert.BertEncoder`.

Costs (algorithm.md §2; D = width, H = heads, hd = head_dim, N = config.seq_len tokens, per example):
    qk    entry: 2H(D+1) params, N(2HD + NH) MACs
    vo    entry: H(2D+1) params, N(2HD + NH) MACs
    mlp   entry: 2D+1 params,    N 2D MACs
    heads entry: hd(4D+3) params, N(4 hd D + 2N hd) MACs (one head at full head_dim; an upper bound: it
                 overlaps qk/vo entries)
MACs count the projections, QK^T and the attention-weighted sum of V over all N x N query-key pairs (also
when causal: the full matrix is computed); embedding lookups, softmax, activations, norms and bias
additions cost 0. The base is everything no group removes: the word, position and token-type embedding
tables (params), the norms, the W_o and fc2 biases, and the head (D x num_classes MACs).
Slicing (algorithm.md §5) is the ViT's: the blocks have the ViT's layout (`encoderblock_{i}` with `attn`
and `mlp`), so `spp_jax.adapters.vit.ViTAdapter`'s slicing and weight norms serve unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from spp_jax.adapters.base import ArchSpec, register_adapter
from spp_jax.adapters.vit import ViTAdapter, blocks_cost, encoder_mask_spec
from spp_jax.errors import ConfigError
from spp_jax.groups import MaskSpec
from spp_jax.models.bert import BertConfig, BertEncoder
from spp_jax.models.vit import LayerDims, layers_from_json, layers_to_json

GROUPS = ("qk", "vo", "mlp", "heads")


def bert_cost(config: BertConfig, layers: Sequence[LayerDims]) -> tuple[int, int]:
    """(params, MACs per example at `config.seq_len` tokens) of a BERT with the given per-layer dims,
    counted from the shapes."""
    c = config
    d, n = c.width, c.seq_len
    params = (c.vocab_size + c.max_len + c.type_vocab_size) * d  # embedding tables (lookups: 0 MACs)
    params += 2 * d if c.embed_norm else 0
    block_params, macs = blocks_cost(d, n, layers)
    params += block_params
    params += 2 * d if c.final_norm else 0
    if c.num_classes:
        params += d * c.num_classes + c.num_classes
        macs += d * c.num_classes
    return params, macs


@dataclasses.dataclass(frozen=True)
class BertAdapter:
    """Adapter for a dense BERT of `config`, pruning the mask groups named in `groups`."""

    config: BertConfig
    groups: tuple[str, ...] = ("qk", "vo", "mlp")
    name: str = "bert"

    def __post_init__(self):
        bad = [g for g in self.groups if g not in GROUPS]
        if bad or not self.groups:
            raise ConfigError(
                f"mask groups {list(self.groups)} are not a non-empty subset of {GROUPS}; choose from those"
            )

    # -- declaration -------------------------------------------------------------------------------
    def mask_spec(self) -> MaskSpec:
        c = self.config
        cost = lambda layers: bert_cost(c, layers)
        return encoder_mask_spec(
            self.groups, c.depth, c.width, c.num_heads, c.head_dim, c.mlp_dim, c.seq_len, cost
        )

    def dense_spec(self) -> ArchSpec:
        return self._arch_spec(self.config.dense_layers())

    def module(self, arch_spec: ArchSpec | None = None) -> BertEncoder:
        if arch_spec is None:
            return BertEncoder(self.config)
        return BertEncoder(BertConfig.from_json(arch_spec["config"]), layers_from_json(arch_spec["layers"]))

    def arch_cost(self, arch_spec: ArchSpec) -> tuple[int, int]:
        return bert_cost(BertConfig.from_json(arch_spec["config"]), layers_from_json(arch_spec["layers"]))

    def _arch_spec(self, layers: Sequence[LayerDims]) -> ArchSpec:
        return {
            "arch": self.name,
            "config": self.config.to_json(),
            "groups": list(self.groups),
            "layers": layers_to_json(layers),
        }

    # -- the ViT's block layout: its norms and slicing apply as they are ------------------------------
    # They read only config.{depth, num_heads, head_dim, mlp_dim, mlp_mask_pre_act}, self.groups,
    # self.mask_spec() and self._arch_spec(), which a BertAdapter has with the same meaning.
    entry_weight_norms = ViTAdapter.entry_weight_norms
    entry_out_weight_norms = ViTAdapter.entry_out_weight_norms
    normalize_keep = ViTAdapter.normalize_keep
    extract = ViTAdapter.extract
    _slice_block = ViTAdapter._slice_block


def _from_spec(arch_spec: ArchSpec) -> BertAdapter:
    return BertAdapter(BertConfig.from_json(arch_spec["config"]), tuple(arch_spec["groups"]))


register_adapter("bert", _from_spec)
