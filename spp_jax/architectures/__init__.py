"""Architectures: what a run config's `model.arch` names.

An architecture entry ties together the code of one architecture: its Flax model (spp_jax.models.<arch>),
its adapter (spp_jax.adapters.<arch>: mask groups, costs, slicing) and its importers
(spp_jax.importers.<arch>*). It builds the adapter a run config describes, loads the pretrained weights
(`load_pretrained`), checks the checkpoint a config names before a workdir is touched (`check_init`), and
names the model keys that identify a workdir (`fingerprint`). `CONFIG_RULES` are its `model.*` keys.
`tiny_example` gives the adapter-conformance test (masked == dense at all-ones masks, extracted ==
binary-masked, declared cost == counted cost, save/load round trip) a tiny random instance, so a new
architecture is checked as soon as it is registered.
"""

from __future__ import annotations

from typing import Any, Protocol

from spp_jax.registry import lookup

ARCHITECTURES = {
    "vit": "spp_jax.architectures.vit:ViTArchitecture",
    "llama": "spp_jax.architectures.llama:LlamaArchitecture",
    "swin": "spp_jax.architectures.swin:SwinArchitecture",
    "clip": "spp_jax.architectures.clip:ClipArchitecture",
    "bert": "spp_jax.architectures.bert:BertArchitecture",
}


class Architecture(Protocol):
    name: str
    CONFIG_RULES: dict

    def build_adapter(self, cfg: Any, task: Any = None, num_classes: int | None = None) -> Any:
        """The adapter of the model `cfg` describes; a class head has `num_classes` classes (the run
        passes the task's, spp_jax.stages.context), or, when None, as many as `task.num_classes()` says."""
        ...

    def load_pretrained(self, cfg: Any, adapter: Any) -> dict: ...

    def check_init(self, cfg: Any) -> None: ...

    def fingerprint(self, cfg: Any) -> dict: ...

    def report_model(self, cfg: Any) -> dict: ...

    def tiny_example(self, groups: tuple[str, ...] | None, seed: int) -> tuple[Any, dict, tuple]:
        """(adapter, random params, example inputs) of a tiny instance with mask groups `groups` (None =
        every group the architecture has): what tests/test_conformance.py checks every architecture on."""
        ...


def architecture_class(name: str) -> type:
    return lookup(ARCHITECTURES, name, "model.arch")


def build_architecture(cfg: Any) -> Architecture:
    return architecture_class(cfg.model.get("arch", "vit"))()


__all__ = ["ARCHITECTURES", "Architecture", "architecture_class", "build_architecture"]
