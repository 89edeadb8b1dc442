"""One `Mesh` over every device of every process: batch sharded on "data", params and masks replicated.

Works unchanged on one CPU, 8 fake CPU devices (`--xla_force_host_platform_device_count=8`), a GPU and a
multi-host TPU pod (call `jax.distributed.initialize()` first; each process feeds its local batch shard).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spp_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Turn this process's local batch (numpy) into global arrays sharded over the data axis."""
    sharding = batch_sharding(mesh)
    n = mesh.devices.size
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if (v.shape[0] * jax.process_count()) % n:
            raise ConfigError(
                f"global batch {v.shape[0] * jax.process_count()} is not divisible by the {n} devices "
                "of the mesh: pick a batch size that is a multiple of the device count"
            )
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a host pytree on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
