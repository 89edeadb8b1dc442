"""Name -> "module:attribute" registries whose entries are imported on first use, so a config naming one
entry never imports the others' code (spp_jax.tasks, spp_jax.architectures)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from typing import Any

from spp_jax.errors import ConfigError


def lookup(registry: Mapping[str, str], name: str, key: str) -> Any:
    """The attribute `registry[name]` points at; an unknown name is a one-line ConfigError naming `key`."""
    if name not in registry:
        raise ConfigError(f"{key}={name!r} is unknown; use one of {sorted(registry)}")
    module, attr = registry[name].split(":")
    return getattr(importlib.import_module(module), attr)


def lazy_exports(package: str, exports: Mapping[str, str], names: list[str]) -> tuple[Callable, Callable]:
    """`(__getattr__, __dir__)` of a package whose `exports` (name -> module) load on first use (PEP 562);
    any other public name is the package's submodule of that name, imported on first use too."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
