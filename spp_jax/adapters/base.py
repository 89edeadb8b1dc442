"""The adapter protocol: what path, selection and extraction code may ask of an architecture.

An adapter declares the mask groups (`mask_spec`), builds the Flax module for the dense or any pruned
shape (`module`), slices a param tree for a keep-set (`extract`, algorithm.md §5), counts the params and
MACs of an architecture spec (`arch_cost`), names the weight slices of each entry for the magnitude
baseline (`entry_weight_norms`) and the weight slice that consumes each entry's masked activation for the
wanda baseline (`entry_out_weight_norms`). Architecture specs are JSON dicts with an "arch" key naming the
adapter, so a saved pruned model can be rebuilt from its spec alone: `adapter_from_spec` finds the adapter
class in `ADAPTERS` (name -> "module:class", imported on first use as spp_jax.registry's entries, so a
spec never imports the other architectures' code) and calls its `from_spec`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import numpy as np

from spp_jax.errors import CheckpointMismatch
from spp_jax.groups import KeepSet, Masks, MaskSpec
from spp_jax.registry import lookup

Params = dict[str, Any]
ArchSpec = dict[str, Any]
Order = Mapping[str, Any]  # group name -> int [depth, size], each row a permutation of range(size)


def kept_indices(keep: KeepSet, order: Order | None, group: str, layer: int, size: int) -> np.ndarray:
    """The indices of `group`'s kept entries in `layer` (all `size` when the group is not pruned), ascending,
    or in the sequence of `order[group][layer]` when an order is given."""
    if group not in keep:
        return np.arange(size)
    kept = np.asarray(keep[group][layer], bool)
    if order is None or group not in order:
        return np.flatnonzero(kept)
    seq = np.asarray(order[group][layer], np.int64)
    return seq[kept[seq]]


class Adapter(Protocol):
    name: str

    def mask_spec(self) -> MaskSpec: ...

    def module(self, arch_spec: ArchSpec | None = None) -> nn.Module: ...

    def dense_spec(self) -> ArchSpec: ...

    def normalize_keep(self, keep: KeepSet) -> KeepSet: ...

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
        """Slice `params` to the keep-set (algorithm.md §5). `order` (group -> int [depth, size], a
        permutation per layer) lays the kept entries out in that order instead of ascending index (the
        weight family, spp_jax.family); `source` is the arch spec `params` are in when it is not the dense
        one (entries with an identity of their own, the Llama's RoPE pairs, keep it through the slicing)."""
        ...

    def arch_cost(self, arch_spec: ArchSpec) -> tuple[int, int]: ...

    def entry_weight_norms(self, params: Params) -> dict[str, Any]:
        """Per mask entry ([depth, size] per group), the product of the norms of the weight slices it owns
        (the magnitude baseline, spp_jax.baselines)."""
        ...

    def entry_out_weight_norms(self, params: Params) -> dict[str, Any]:
        """Per mask entry ([depth, size] per group), the L2 norm of the weight slice that consumes the
        activation the entry's mask multiplies (1 where that activation feeds no weight, e.g. q and k, which
        meet each other). The wanda baseline (spp_jax.baselines) multiplies it by the norms of those
        activations, which the module must sow at each mask point: per layer, in the collection
        `baselines.MASK_INPUTS` under the group's name, the per-entry sum of squares of every activation
        that mask multiplies (a [size] vector each), only when that collection is mutable. Layers are told
        apart by module path (layer index in the path, e.g. encoderblock_3)."""
        ...


ADAPTERS = {
    "vit": "spp_jax.adapters.vit:ViTAdapter",
    "bert": "spp_jax.adapters.bert:BertAdapter",
    "llama": "spp_jax.adapters.llama:LlamaAdapter",
    "swin": "spp_jax.adapters.swin:SwinAdapter",
    "clip": "spp_jax.adapters.clip:ClipAdapter",
}
_REGISTRY: dict[str, Callable[[ArchSpec], Adapter]] = {}  # register_adapter's, before ADAPTERS


def register_adapter(name: str, from_spec: Callable[[ArchSpec], Adapter]) -> None:
    """Register `from_spec(arch_spec) -> Adapter` for specs whose "arch" is `name`."""
    _REGISTRY[name] = from_spec


def adapter_from_spec(arch_spec: Mapping[str, Any]) -> Adapter:
    """The adapter of a saved arch spec: its "arch" entry's `from_spec` (`register_adapter`, `ADAPTERS`)."""
    arch = arch_spec.get("arch")
    if arch in _REGISTRY:
        return _REGISTRY[arch](dict(arch_spec))
    if arch not in ADAPTERS:
        raise CheckpointMismatch(
            f"architecture spec names arch={arch!r}, known: {sorted(set(ADAPTERS) | set(_REGISTRY))}; "
            "is this a spp_jax pruned-model directory?"
        )
    return lookup(ADAPTERS, arch, "arch").from_spec(dict(arch_spec))
