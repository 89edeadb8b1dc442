"""Mask groups: the architecture-independent declaration of what SPP prunes.

An architecture adapter declares its prunable inner dimensions as a `MaskSpec`: a tuple of `MaskGroup`s,
each a `[depth, size]` array of scalar masks plus what one entry costs (algorithm.md §2). The mask pytree is
a plain `dict[str, jax.Array]` keyed by group name, with no `None` leaves. Path, selection and extraction
code works only through this declaration.

Cost model (algorithm.md §2, D = width, H = heads, N = tokens):
    qk  entry: 2H(D+1) params, (2HD + NH) MACs per token
    vo  entry: H(2D+1) params, (2HD + NH) MACs per token
    mlp entry: (2D+1) params,   2D       MACs per token
Costs are linear in the kept entries: kept = base + sum_g sum_i keep_gi * cost_g.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Masks = dict[str, jax.Array]
KeepSet = dict[str, np.ndarray]  # group name -> bool [depth, size]


@dataclasses.dataclass(frozen=True)
class MaskGroup:
    """One prunable group: `depth` layers with `size` entries each.

    Attributes:
      name: key in the mask pytree ("qk", "vo", "mlp", "heads", ...).
      depth: number of layers (leading axis of the mask array).
      size: entries per layer.
      params_per_entry: parameters removed with one entry.
      macs_per_entry: multiply-accumulates per example removed with one entry.
      exact_cost: False when an entry's cost depends on other groups (e.g. whole heads), so the linear cost
        is an upper bound rather than the exact count.
    """

    name: str
    depth: int
    size: int
    params_per_entry: float
    macs_per_entry: float
    exact_cost: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return (self.depth, self.size)

    @property
    def num_entries(self) -> int:
        return self.depth * self.size


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """All mask groups of one model plus the cost of everything no group can remove."""

    groups: tuple[MaskGroup, ...]
    base_params: float
    base_macs: float

    def __post_init__(self):
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate mask group names: {names}")
        if not self.groups:
            raise ValueError("a MaskSpec needs at least one group")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def group(self, name: str) -> MaskGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"unknown mask group {name!r}; groups are {self.names}")

    def init_masks(self, dtype=jnp.float32) -> Masks:
        """All-ones masks: the masked model equals the dense one (algorithm.md §7 item 1)."""
        return {g.name: jnp.ones(g.shape, dtype) for g in self.groups}

    def full_keep(self) -> KeepSet:
        return {g.name: np.ones(g.shape, bool) for g in self.groups}

    def check_masks(self, masks: Mapping[str, jax.Array]) -> None:
        """Raise a one-line error when `masks` does not match this declaration."""
        if set(masks) != set(self.names):
            raise ValueError(
                f"mask groups {sorted(masks)} do not match the model's {sorted(self.names)}; "
                "was this path made with another model or group setting?"
            )
        for g in self.groups:
            if tuple(masks[g.name].shape) != g.shape:
                raise ValueError(
                    f"mask group {g.name!r} has shape {tuple(masks[g.name].shape)}, the model needs "
                    f"{g.shape}; was this path made with another model variant?"
                )

    @property
    def total_params(self) -> float:
        return self.base_params + sum(g.params_per_entry * g.num_entries for g in self.groups)

    @property
    def total_macs(self) -> float:
        return self.base_macs + sum(g.macs_per_entry * g.num_entries for g in self.groups)

    @property
    def block_params(self) -> float:
        """Parameters the groups can remove (the denominator of a 'fraction of block params' target)."""
        return self.total_params - self.base_params

    def kept_cost(self, keep: Mapping[str, np.ndarray | jax.Array]) -> tuple[float, float]:
        """(params, MACs) of the model that keeps `keep` (bool or 0/1 arrays per group).

        Works on numpy (host) and on jax arrays (inside jit)."""
        params = self.base_params
        macs = self.base_macs
        for g in self.groups:
            n = (
                keep[g.name].astype(jnp.float32).sum()
                if isinstance(keep[g.name], jax.Array)
                else float(np.asarray(keep[g.name], bool).sum())
            )
            params = params + n * g.params_per_entry
            macs = macs + n * g.macs_per_entry
        return params, macs

    def to_json(self) -> dict:
        return {
            "groups": [dataclasses.asdict(g) for g in self.groups],
            "base_params": self.base_params,
            "base_macs": self.base_macs,
        }

    @classmethod
    def from_json(cls, d: Mapping) -> MaskSpec:
        return cls(
            groups=tuple(MaskGroup(**g) for g in d["groups"]),
            base_params=d["base_params"],
            base_macs=d["base_macs"],
        )
