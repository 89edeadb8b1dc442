"""The base of the adapters whose model is stacks of blocks with per-layer dims (ViT, BERT, Llama, Swin).

Such an adapter is a frozen dataclass (config, groups, name) with the arch spec {"arch": name, "config":
config json, "groups": [...], "layers": per-layer dims json} (algorithm.md §5). `LayerwiseAdapter` holds
what they share: the group check, the dense spec, the module and cost of a spec, the adapter of a spec
(`from_spec`), the keep-set normalisation (a block whose attention branch is gone keeps none of its
attention entries), the frame of `extract` and the per-block loops. An architecture names its group kinds,
config, module, cost count and layer json (class attributes), declares its groups (`mask_spec`), and
reads (`_blocks`, `entry_*_norms`) and slices (`_slice_block`) one block's params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from spp_jax.adapters.base import ArchSpec, Order, Params
from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.groups import KeepSet, Masks, MaskSpec
from spp_jax.models.layers import layers_from_json, layers_to_json

Block = tuple[int, int, Params]  # (stack, block index in it, block params)


def weight_norm(w: Any, axes: int | tuple[int, ...]) -> np.ndarray:
    """The L2 norm of `w` over `axes`, in float64 (the weight slices of the baselines' scores)."""
    return np.sqrt(np.square(np.asarray(w, np.float64)).sum(axis=axes))


@dataclasses.dataclass(frozen=True)
class LayerwiseAdapter:
    """Adapter for a dense model of `config`, pruning the mask groups named in `groups` (kinds of GROUPS,
    each at most once) in every stack of blocks (`_stacks`: one, or Swin's stages)."""

    config: Any
    groups: tuple[str, ...] = ("qk", "vo", "mlp")
    name: str = ""

    GROUPS: ClassVar[tuple[str, ...]] = ()  # the group kinds of the architecture
    HEADS: ClassVar[str] = "heads"  # the kind that removes whole (query or kv) heads
    BLOCK: ClassVar[str] = "block_"  # the param key of block i is f"{BLOCK}{i}" (one stack)
    MODEL: ClassVar[str] = ""  # the model's name in error messages
    config_class: ClassVar[Any]  # from_json(config json) -> config
    module_class: ClassVar[Any]  # module_class(config, layers) -> the Flax module
    count_cost: ClassVar[Callable[..., tuple[int, float]]]  # staticmethod: (config, layers) -> (params, MACs)
    layers_to_json = staticmethod(layers_to_json)
    layers_from_json = staticmethod(layers_from_json)

    def __post_init__(self) -> None:
        bad = [g for g in self.groups if g not in self.GROUPS]
        if bad or not self.groups or len(set(self.groups)) != len(self.groups):
            raise ConfigError(
                f"mask groups {list(self.groups)} are not a non-empty subset of {self.GROUPS}; "
                "choose from those"
            )

    @classmethod
    def from_spec(cls, arch_spec: ArchSpec) -> LayerwiseAdapter:
        """The adapter an arch spec was written by (`spp_jax.adapters.adapter_from_spec`)."""
        return cls(cls.config_class.from_json(arch_spec["config"]), tuple(arch_spec["groups"]))

    # -- declaration -------------------------------------------------------------------------------
    def mask_spec(self) -> MaskSpec:
        raise NotImplementedError

    def dense_spec(self) -> ArchSpec:
        return self._arch_spec(self.config.dense_layers())

    def module(self, arch_spec: ArchSpec | None = None) -> Any:
        if arch_spec is None:
            return self.module_class(self.config)
        layers = self.layers_from_json(arch_spec["layers"])
        return self.module_class(self.config_class.from_json(arch_spec["config"]), layers)

    def arch_cost(self, arch_spec: ArchSpec) -> tuple[int, float]:
        layers = self.layers_from_json(arch_spec["layers"])
        return self.count_cost(self.config_class.from_json(arch_spec["config"]), layers)

    def _arch_spec(self, layers: Sequence[Any]) -> ArchSpec:
        return {
            "arch": self.name,
            "config": self.config.to_json(),
            "groups": list(self.groups),
            "layers": self.layers_to_json(layers),
        }

    # -- blocks --------------------------------------------------------------------------------------
    def _stacks(self) -> list[tuple[str, int]]:
        """(group-name prefix, blocks) of each stack of blocks with groups of its own: one, unprefixed."""
        return [("", self.config.depth)]

    def _group_names(self) -> list[str]:
        """Every group's name, stack-major."""
        return [prefix + g for prefix, _ in self._stacks() for g in self.groups]

    def _blocks(self, params: Params) -> list[Block]:
        """(stack, block, block params) of every block, in order; params without one are not this model."""
        c, out = self.config, []
        for i in range(c.depth):
            name = f"{self.BLOCK}{i}"
            if name not in params:
                raise CheckpointMismatch(
                    f"params have no {name}; they are not a depth-{c.depth} {self.MODEL}"
                )
            out.append((0, i, params[name]))
        return out

    def _per_entry(
        self, params: Params, fn: Callable[[int, Params], Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """Per group, `fn(stack, block params)[kind]` stacked over the stack's blocks ([blocks, size])."""
        prefixes = [prefix for prefix, _ in self._stacks()]
        rows: dict[str, list[np.ndarray]] = {name: [] for name in self._group_names()}
        for s, _, block in self._blocks(params):
            per = fn(s, block)
            for g in self.groups:
                rows[prefixes[s] + g].append(per[g])
        return {g: np.stack(r).astype(np.float32) for g, r in rows.items()}

    # -- slicing -----------------------------------------------------------------------------------
    def normalize_keep(self, keep: KeepSet) -> KeepSet:
        """Drop entries that no longer affect the function: qk, vo and HEADS of a block whose attention
        branch is gone (no value dim or no head left). Declared cost of the result == `arch_cost` (when
        every group's cost is exact)."""
        self.mask_spec().check_masks(keep)
        out = {name: np.asarray(keep[name], bool).copy() for name in self._group_names()}
        for prefix, depth in self._stacks():
            vo = out.get(prefix + "vo", np.ones((depth, 1), bool))
            heads = out.get(prefix + self.HEADS, np.ones((depth, 1), bool))
            dead = ~vo.any(axis=1) | ~heads.any(axis=1)
            for g in ("qk", "vo", self.HEADS):
                if prefix + g in out:
                    out[prefix + g][dead] = False
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
        masks * keep. `order` and `source` as `spp_jax.adapters.base.Adapter.extract`. Returns (params,
        arch spec); `module(arch_spec)` runs them.
        """
        if fold_masks and masks is None:
            raise ConfigError("fold_masks=True needs the mask values (masks=...)")
        keep = self.normalize_keep(keep)
        mvals = {g: np.asarray(masks[g], np.float32) for g in keep} if fold_masks else {}
        src = self.config.dense_layers() if source is None else self.layers_from_json(source["layers"])
        new, layers = self._slice_blocks(params, keep, mvals, order, src)
        return new, self._arch_spec(layers)

    def _slice_blocks(
        self, params: Params, keep: KeepSet, mvals: dict[str, np.ndarray], order: Order | None,
        src: Sequence[Any],
    ) -> tuple[Params, list[Any]]:  # fmt: skip
        """(params with every block sliced, the blocks' new dims); `src` are the blocks' dims in `params`."""
        new = {k: v for k, v in params.items() if not k.startswith(self.BLOCK)}
        layers = []
        for _, i, block in self._blocks(params):
            new[f"{self.BLOCK}{i}"], dims = self._slice_block(block, keep, mvals, i, order, src[i])
            layers.append(dims)
        return new, layers

    def _slice_block(
        self, block: Params, keep: KeepSet, mvals: dict[str, np.ndarray], i: int, order: Order | None,
        src: Any,
    ) -> tuple[Params, Any]:  # fmt: skip
        """Block i's params sliced to the keep-set (`mvals` folded in) and its new dims; `src` are its dims
        in the params given."""
        raise NotImplementedError
