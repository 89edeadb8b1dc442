"""Name -> "module:attribute" registries whose entries are imported on first use, so a config naming one
entry never imports the others' code (spp_jax.tasks, spp_jax.architectures)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from spp_jax.errors import ConfigError


def lookup(registry: Mapping[str, str], name: str, key: str) -> Any:
    """The attribute `registry[name]` points at; an unknown name is a one-line ConfigError naming `key`."""
    if name not in registry:
        raise ConfigError(f"{key}={name!r} is unknown; use one of {sorted(registry)}")
    module, attr = registry[name].split(":")
    return getattr(importlib.import_module(module), attr)
