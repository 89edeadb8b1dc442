"""Architectures: what a run config's `model.arch` names.

An architecture entry ties together the code of one architecture: its Flax model (spp_jax.models.<arch>),
its adapter (spp_jax.adapters.<arch>: mask groups, costs, slicing) and its importers
(spp_jax.importers.<arch>*). It builds the adapter a run config describes, loads the pretrained weights
(`load_pretrained`), checks the checkpoint a config names before a workdir is touched (`check_init`), and
names the model keys that identify a workdir (`fingerprint`). `CONFIG_RULES` are its `model.*` keys.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from spp_jax.errors import ConfigError

ARCHITECTURES = {
    "vit": "spp_jax.architectures.vit:ViTArchitecture",
    "llama": "spp_jax.architectures.llama:LlamaArchitecture",
}


class Architecture(Protocol):
    name: str
    CONFIG_RULES: dict

    def build_adapter(self, cfg: Any, task: Any) -> Any: ...

    def load_pretrained(self, cfg: Any, adapter: Any) -> dict: ...

    def check_init(self, cfg: Any) -> None: ...

    def fingerprint(self, cfg: Any) -> dict: ...

    def report_model(self, cfg: Any) -> dict: ...


def architecture_class(name: str) -> type:
    if name not in ARCHITECTURES:
        raise ConfigError(f"model.arch={name!r} is unknown; use one of {sorted(ARCHITECTURES)}")
    module, cls = ARCHITECTURES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_architecture(cfg: Any) -> Architecture:
    return architecture_class(cfg.model.get("arch", "vit"))()


__all__ = ["ARCHITECTURES", "Architecture", "architecture_class", "build_architecture"]
