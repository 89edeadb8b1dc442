"""One `Mesh` over every device of every process, with a "data" and an "fsdp" axis.

- The batch is sharded over both axes (`PartitionSpec(("data", "fsdp"))`): every device reads its own rows.
- Weights (and their AdamW moments) are sharded over "fsdp" by shape (`fsdp_spec`): each array's largest
  axis that the fsdp size divides, as the "fsdp" rule of big_vision and most JAX FSDP set-ups do; arrays
  under `MIN_SHARD_SIZE` values (biases, norms, scalars) and arrays without such an axis stay replicated.
  XLA gathers a weight where a layer needs it and reduce-scatters its gradient, so a device holds 1/fsdp
  of the weights and optimizer states between steps.
- Masks and the SPP optimizer state are small and stay replicated.

`mesh.fsdp = 1` (the default) is a pure data-parallel mesh: everything but the batch is replicated.
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
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
MIN_SHARD_SIZE = 1024  # arrays with fewer values are replicated: sharding them saves nothing


def fsdp_size(cfg: Any) -> int:
    """The config's `mesh.fsdp` (1 for configs made before the key existed)."""
    mesh = cfg.get("mesh") if hasattr(cfg, "get") else None
    return int(mesh.get("fsdp", 1)) if mesh is not None else 1


def make_mesh(devices: list[jax.Device] | None = None, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all processes); data = count / fsdp."""
    devices = jax.devices() if devices is None else list(devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ConfigError(
            f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices; use a divisor of {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def run_mesh(cfg: Any) -> Mesh:
    """The mesh of a run: every device, `cfg.mesh.fsdp` of them on the fsdp axis."""
    return make_mesh(fsdp=fsdp_size(cfg))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Shard the largest axis of `shape` that `fsdp` divides (the first of equal ones); replicate arrays
    under MIN_SHARD_SIZE values, with no such axis, or when fsdp is 1."""
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE:
        return PartitionSpec()
    axes = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not axes:
        return PartitionSpec()
    axis = max(axes, key=lambda i: (shape[i], -i))
    return PartitionSpec(*([None] * axis), FSDP_AXIS)


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs): weights and their optimizer states
    by `fsdp_spec`, so a weight and its AdamW moments share one layout."""
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp)), tree)


def leaf_sharding(mesh: Mesh):
    """`shape -> NamedSharding` by the fsdp rule (for restoring a checkpoint straight onto the mesh)."""
    fsdp = mesh.shape[FSDP_AXIS]
    return lambda shape: NamedSharding(mesh, fsdp_spec(tuple(shape), fsdp))


def place_params(tree: Any, mesh: Mesh) -> Any:
    """Put a weight pytree on the mesh, sharded over fsdp by `fsdp_shardings` (replicated when fsdp is 1)."""
    return jax.device_put(tree, fsdp_shardings(tree, mesh))


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Turn this process's local batch (numpy) into global arrays sharded over the data and fsdp axes."""
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
