"""Two-tower (CLIP) adapter: `spp_jax.models.clip.TwoTower`, composed of a ViT adapter (image tower) and a
BERT adapter (text tower).

Mask groups are the towers' own, renamed with the tower as a prefix: "image/qk", "image/vo", "image/mlp",
"image/heads", "text/qk", ... (the masks of `TwoTower`). Costs per example are one image and one text: the
image tower's at its `image_size`, the text tower's at its `seq_len` (spp_jax.adapters.vit / .bert);
the base adds both projections (params and MACs) and the logit scale (1 param). Slicing, keep-set
normalisation and weight norms are the sub-adapters', applied to each tower's params and keep-set part.

Arch spec: {"arch": "clip", "config": ClipConfig json, "image_groups": [...], "text_groups": [...],
"image": the ViT adapter's spec, "text": the BERT adapter's spec}. A tower with no groups is not pruned:
it stays dense, and its whole cost is in the base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from spp_jax.adapters.base import ArchSpec, Order, Params
from spp_jax.adapters.bert import BertAdapter
from spp_jax.adapters.vit import ViTAdapter
from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.groups import KeepSet, Masks, MaskSpec
from spp_jax.models.clip import TOWERS, ClipConfig, TwoTower, split_masks

TOWER_GROUPS = ("qk", "vo", "mlp", "heads")  # each tower's kinds (the ViT's and BERT's groups)
_DEFAULT = ("qk", "vo", "mlp")  # groups of a sub-adapter only used for a dense, unpruned tower


def proj_cost(config: ClipConfig) -> tuple[int, int]:
    """(params, MACs per example) of both projections and the logit scale."""
    e = config.embed_dim
    params, macs = 1, 0  # logit_scale
    for width, bias in (
        (config.image.width, config.image_proj_bias),
        (config.text.width, config.text_proj_bias),
    ):
        params += width * e + (e if bias else 0)
        macs += width * e
    return params, macs


def prefixed(tower: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{tower}/{k}": v for k, v in tree.items()}


@dataclasses.dataclass(frozen=True)
class ClipAdapter:
    """Adapter for a dense two-tower model of `config`, pruning `image_groups` of the image tower and
    `text_groups` of the text tower (kinds from TOWER_GROUPS; one of them may be empty)."""

    config: ClipConfig
    image_groups: tuple[str, ...] = ("qk", "vo", "mlp")
    text_groups: tuple[str, ...] = ("qk", "vo", "mlp")
    name: str = "clip"

    def __post_init__(self):
        for tower, groups in (("image", self.image_groups), ("text", self.text_groups)):
            bad = [g for g in groups if g not in TOWER_GROUPS]
            if bad or len(set(groups)) != len(groups):
                raise ConfigError(
                    f"{tower} mask groups {list(groups)} are not distinct kinds of {TOWER_GROUPS}; "
                    "choose from those"
                )
        if not self.image_groups and not self.text_groups:
            raise ConfigError(
                "a two-tower model needs mask groups in at least one tower; give image or text groups"
            )

    @classmethod
    def from_spec(cls, arch_spec: ArchSpec) -> ClipAdapter:
        """The adapter an arch spec was written by (`spp_jax.adapters.adapter_from_spec`)."""
        return cls(
            ClipConfig.from_json(arch_spec["config"]),
            tuple(arch_spec["image_groups"]),
            tuple(arch_spec["text_groups"]),
        )

    # -- the towers' adapters ----------------------------------------------------------------------
    @property
    def image_adapter(self) -> ViTAdapter:
        return ViTAdapter(self.config.image, self.image_groups or _DEFAULT)

    @property
    def text_adapter(self) -> BertAdapter:
        return BertAdapter(self.config.text, self.text_groups or _DEFAULT)

    def _towers(self) -> dict[str, tuple[Any, tuple[str, ...]]]:
        """{tower: (its adapter, the groups pruned there)}."""
        return {
            "image": (self.image_adapter, self.image_groups),
            "text": (self.text_adapter, self.text_groups),
        }

    # -- declaration -------------------------------------------------------------------------------
    def mask_spec(self) -> MaskSpec:
        base_params, base_macs = proj_cost(self.config)
        groups = []
        for tower, (sub, pruned) in self._towers().items():
            if not pruned:  # an unpruned tower is all base
                p, m = sub.arch_cost(sub.dense_spec())
                base_params, base_macs = base_params + p, base_macs + m
                continue
            spec = sub.mask_spec()
            base_params += spec.base_params
            base_macs += spec.base_macs
            groups += [dataclasses.replace(g, name=f"{tower}/{g.name}") for g in spec.groups]
        return MaskSpec(tuple(groups), float(base_params), float(base_macs))

    def dense_spec(self) -> ArchSpec:
        return self._arch_spec({t: sub.dense_spec() for t, (sub, _) in self._towers().items()})

    def _arch_spec(self, subs: Mapping[str, ArchSpec]) -> ArchSpec:
        return {
            "arch": self.name,
            "config": self.config.to_json(),
            "image_groups": list(self.image_groups),
            "text_groups": list(self.text_groups),
            "image": dict(subs["image"]),
            "text": dict(subs["text"]),
        }

    def module(self, arch_spec: ArchSpec | None = None) -> TwoTower:
        if arch_spec is None:
            return TwoTower(self.config)
        config = ClipConfig.from_json(arch_spec["config"])
        return TwoTower(
            config,
            image_layers=self.image_adapter.module(arch_spec["image"]).layers,
            text_layers=self.text_adapter.module(arch_spec["text"]).layers,
        )

    def arch_cost(self, arch_spec: ArchSpec) -> tuple[int, int]:
        params, macs = proj_cost(ClipConfig.from_json(arch_spec["config"]))
        for tower, (sub, _) in self._towers().items():
            p, m = sub.arch_cost(arch_spec[tower])
            params, macs = params + p, macs + m
        return params, macs

    # -- scores --------------------------------------------------------------------------------------
    def _per_tower(self, params: Params, method: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for tower, (sub, pruned) in self._towers().items():
            if pruned:
                out.update(prefixed(tower, getattr(sub, method)(_tower_params(params, tower))))
        return out

    def entry_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """The towers' `entry_weight_norms` under the prefixed group names."""
        return self._per_tower(params, "entry_weight_norms")

    def entry_out_weight_norms(self, params: Params) -> dict[str, np.ndarray]:
        """The towers' `entry_out_weight_norms` under the prefixed group names (TwoTower sows the masked
        activations under the same names)."""
        return self._per_tower(params, "entry_out_weight_norms")

    # -- slicing -----------------------------------------------------------------------------------
    def normalize_keep(self, keep: KeepSet) -> KeepSet:
        """Each tower's `normalize_keep` on its part of the keep-set."""
        self.mask_spec().check_masks(keep)
        parts = split_masks(keep)
        out: KeepSet = {}
        for tower, (sub, pruned) in self._towers().items():
            if pruned:
                out.update(prefixed(tower, sub.normalize_keep(parts[tower])))
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
        """Slice each tower by its part of `keep` (and of `masks` with `fold_masks`) with its adapter; the
        projections and the logit scale are kept as they are. Returns (params, arch spec)."""
        if fold_masks and masks is None:
            raise ConfigError("fold_masks=True needs the mask values (masks=...)")
        keep = self.normalize_keep(keep)
        keep_parts, mask_parts = split_masks(keep), split_masks(masks)
        order_parts = split_masks(order) if order is not None else {t: None for t in TOWERS}
        new = {k: v for k, v in params.items() if k not in TOWERS}
        subs: dict[str, ArchSpec] = {}
        for tower, (sub, pruned) in self._towers().items():
            tower_params = _tower_params(params, tower)
            if pruned:
                new[tower], subs[tower] = sub.extract(
                    tower_params, keep_parts[tower], mask_parts[tower] if fold_masks else None, fold_masks,
                    order=order_parts[tower], source=source[tower] if source is not None else None,
                )  # fmt: skip
            else:
                new[tower], subs[tower] = tower_params, sub.dense_spec()
        return new, self._arch_spec(subs)


def _tower_params(params: Params, tower: str) -> Params:
    if tower not in params:
        raise CheckpointMismatch(f"params have no {tower!r} tower; they are not a two-tower (CLIP) model")
    return params[tower]
