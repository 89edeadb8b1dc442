"""spp_jax: Solution Path Pruning for pretrained transformers in JAX/Flax.

import spp_jax
module, params, arch_spec = spp_jax.load_pruned("workdir/finetuned/params_0.5")
logits = module.apply({"params": params}, images)
"""

from spp_jax.adapters import ViTAdapter, adapter_from_spec
from spp_jax.checkpoint import PathStore, load_pruned, save_model
from spp_jax.groups import KeepSet, MaskGroup, Masks, MaskSpec
from spp_jax.selection import keep_summary, parse_target, rank_entries, select_subnetwork
from spp_jax.spp import SPPState

__all__ = [
    "KeepSet",
    "MaskGroup",
    "MaskSpec",
    "Masks",
    "PathStore",
    "SPPState",
    "ViTAdapter",
    "adapter_from_spec",
    "keep_summary",
    "load_pruned",
    "parse_target",
    "rank_entries",
    "save_model",
    "select_subnetwork",
]
