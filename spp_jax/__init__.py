"""spp_jax: Solution Path Pruning for pretrained transformers in JAX/Flax.

import spp_jax
module, params, arch_spec = spp_jax.load_pruned("workdir/family", target="params:0.63")
logits = module.apply({"params": params}, images)

The names below load on first use, so `import spp_jax.errors` (every launch script, before it parses its
flags) does not import JAX, Flax, orbax and tfds: a mistyped flag fails in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spp_jax.registry import lazy_exports

_EXPORTS = {
    "KeepSet": "spp_jax.groups",
    "MaskGroup": "spp_jax.groups",
    "MaskSpec": "spp_jax.groups",
    "Masks": "spp_jax.groups",
    "PathStore": "spp_jax.checkpoint",
    "SPPState": "spp_jax.spp",
    "LlamaAdapter": "spp_jax.adapters",
    "SwinAdapter": "spp_jax.adapters",
    "ViTAdapter": "spp_jax.adapters",
    "adapter_from_spec": "spp_jax.adapters",
    "keep_summary": "spp_jax.selection",
    "load_pruned": "spp_jax.family",
    "parse_target": "spp_jax.selection",
    "rank_entries": "spp_jax.selection",
    "save_model": "spp_jax.checkpoint",
    "select_subnetwork": "spp_jax.selection",
}

__all__ = [
    "KeepSet",
    "LlamaAdapter",
    "MaskGroup",
    "MaskSpec",
    "Masks",
    "PathStore",
    "SPPState",
    "SwinAdapter",
    "ViTAdapter",
    "adapter_from_spec",
    "keep_summary",
    "load_pruned",
    "parse_target",
    "rank_entries",
    "save_model",
    "select_subnetwork",
]


# an exported name, or a submodule (`spp_jax.checkpoint` after a bare `import spp_jax`)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)


if TYPE_CHECKING:
    from spp_jax.adapters import LlamaAdapter, SwinAdapter, ViTAdapter, adapter_from_spec
    from spp_jax.checkpoint import PathStore, save_model
    from spp_jax.family import load_pruned
    from spp_jax.groups import KeepSet, MaskGroup, Masks, MaskSpec
    from spp_jax.selection import keep_summary, parse_target, rank_entries, select_subnetwork
    from spp_jax.spp import SPPState
