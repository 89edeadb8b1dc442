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
and `mlp`), so `spp_jax.adapters.vit.EncoderAdapter`'s declaration, slicing and weight norms serve unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from spp_jax.adapters.vit import GROUPS, EncoderAdapter, blocks_cost
from spp_jax.models.bert import BertConfig, BertEncoder
from spp_jax.models.layers import LayerDims

__all__ = ["GROUPS", "BertAdapter", "bert_cost"]


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
class BertAdapter(EncoderAdapter):
    """Adapter for a dense BERT of `config`, pruning the mask groups named in `groups`."""

    config: BertConfig
    name: str = "bert"

    config_class = BertConfig
    module_class = BertEncoder
    count_cost = staticmethod(bert_cost)

    def _tokens(self) -> int:
        return self.config.seq_len
