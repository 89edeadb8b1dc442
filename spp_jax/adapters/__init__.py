"""Architecture adapters: one per architecture, the only code that knows a model's param layout."""

from spp_jax.adapters.base import Adapter, adapter_from_spec, register_adapter
from spp_jax.adapters.vit import ViTAdapter

__all__ = ["Adapter", "ViTAdapter", "adapter_from_spec", "register_adapter"]
