"""Start JAX's multi-process runtime for a run spread over several processes or hosts.

One process per host (TPU pod) or per GPU (SLURM), or several processes on one machine (CPU tests), all
running the same command. `initialize` must run before anything touches the devices:

- on a TPU pod, a SLURM job or an Open MPI launch, JAX reads the coordinator, the process count and this
  process's id from the cluster's environment, so no argument is needed;
- anywhere else give all three: `initialize("host:port", num_processes=N, process_id=i)`, where `host:port`
  is reachable from every process and is where process 0 listens.

On CPU the processes exchange their collectives through gloo (jax config
`jax_cpu_collectives_implementation`); GPUs use NCCL and TPUs their interconnect, as JAX chooses.
Every mistake is a `ConfigError` with one line that names the cause and what to do.
"""

from __future__ import annotations

import re

import jax

from spp_jax.errors import ConfigError

_FLAGS = "--coordinator_address=host:port --num_processes=N --process_id=i"
_NO_CLUSTER = (
    "no cluster to take the {what} from (JAX reads it on a TPU pod, in a SLURM job or under Open MPI); "
    f"give all of {_FLAGS}"
)


def check_args(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Refuse an incomplete or inconsistent set of arguments before anything starts."""
    if (num_processes is None) != (process_id is None):
        given, missing = ("num_processes", "process_id")[:: 1 if process_id is None else -1]
        raise ConfigError(
            f"--{given} is given without --{missing}; give both (with --coordinator_address=host:port), or "
            "neither on a TPU pod or in a SLURM job, where JAX reads them from the cluster"
        )
    if num_processes is not None:
        if num_processes < 1:
            raise ConfigError(f"--num_processes={num_processes} must be at least 1; give the process count")
        if not 0 <= process_id < num_processes:
            raise ConfigError(
                f"--process_id={process_id} is not in [0, {num_processes}); number the processes "
                f"0 to {num_processes - 1}, one id each"
            )
    if coordinator_address is not None:
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/]+):(\d+)", coordinator_address)
        if not m or not 0 < int(m[2]) < 65536:
            raise ConfigError(
                f"--coordinator_address={coordinator_address!r} is not host:port; give the address of "
                "process 0 and a free port, e.g. 10.0.0.2:8476"
            )


def use_cpu_collectives() -> None:
    """Cross-process collectives of the CPU backend through gloo (left alone when set to another one)."""
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int = 300,
) -> None:
    """`jax.distributed.initialize` with the arguments checked and its errors as one-line ConfigErrors.

    Arguments left None come from the cluster's environment (module docstring).
    """
    check_args(coordinator_address, num_processes, process_id)
    use_cpu_collectives()
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=initialization_timeout,
        )
    except (ValueError, RuntimeError) as e:
        raise ConfigError(_explain(e, initialization_timeout)) from None


def _explain(e: Exception, timeout: int) -> str:
    text = str(e).strip()
    first = text.splitlines()[0].rstrip(".") if text else type(e).__name__
    if "Number of processes must be defined" in text:
        return _NO_CLUSTER.format(what="process count")
    if "process id of the current process must be defined" in text:
        return _NO_CLUSTER.format(what="process id")
    if "coordinator_address should be defined" in text:
        return _NO_CLUSTER.format(what="coordinator address")
    if "should only be called once" in text:
        return "jax.distributed is already initialized in this process; initialize it once"
    if "before any JAX" in text or "backend is already initialized" in text:
        return (
            "jax.distributed must start before anything touches the devices; call "
            "spp_jax.distributed.initialize first"
        )
    if re.search(r"DEADLINE_EXCEEDED|timed out|Barrier timed out|UNAVAILABLE", text, re.IGNORECASE):
        return (
            f"the processes did not all meet within {timeout} s ({first[:160]}); start every process with "
            "the same --coordinator_address and --num_processes and its own --process_id, and check that "
            "process 0's host and port are reachable"
        )
    return f"jax.distributed cannot start ({first[:200]}); check {_FLAGS}"


def barrier(name: str) -> None:
    """Wait until every process has reached `barrier(name)` (nothing to wait for with one process).

    After one process changed shared files (a JSON only process 0 writes, directories it moved), the
    others read them only past a barrier."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
