"""Architecture adapters: one per architecture, the only code that knows a model's param layout.

The names below load on first use (as spp_jax.registry's entries), so importing one adapter, or
`adapter_from_spec` for one arch spec, never imports the other architectures' models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spp_jax.registry import lazy_exports

_EXPORTS = {
    "Adapter": "spp_jax.adapters.base",
    "BertAdapter": "spp_jax.adapters.bert",
    "ClipAdapter": "spp_jax.adapters.clip",
    "LlamaAdapter": "spp_jax.adapters.llama",
    "SwinAdapter": "spp_jax.adapters.swin",
    "ViTAdapter": "spp_jax.adapters.vit",
    "adapter_from_spec": "spp_jax.adapters.base",
    "register_adapter": "spp_jax.adapters.base",
}

__all__ = [
    "Adapter",
    "BertAdapter",
    "ClipAdapter",
    "LlamaAdapter",
    "SwinAdapter",
    "ViTAdapter",
    "adapter_from_spec",
    "register_adapter",
]


# an exported name, or a submodule (`spp_jax.adapters.vit` after a bare `import spp_jax.adapters`)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)


if TYPE_CHECKING:
    from spp_jax.adapters.base import Adapter, adapter_from_spec, register_adapter
    from spp_jax.adapters.bert import BertAdapter
    from spp_jax.adapters.clip import ClipAdapter
    from spp_jax.adapters.llama import LlamaAdapter
    from spp_jax.adapters.swin import SwinAdapter
    from spp_jax.adapters.vit import ViTAdapter
