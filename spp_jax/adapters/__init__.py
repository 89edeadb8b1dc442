"""Architecture adapters: one per architecture, the only code that knows a model's param layout."""

from spp_jax.adapters.base import Adapter, adapter_from_spec, register_adapter
from spp_jax.adapters.bert import BertAdapter
from spp_jax.adapters.clip import ClipAdapter
from spp_jax.adapters.llama import LlamaAdapter
from spp_jax.adapters.swin import SwinAdapter
from spp_jax.adapters.vit import ViTAdapter

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
