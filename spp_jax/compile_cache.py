"""JAX's persistent compilation cache, on by default in the launch scripts: a restarted run skips compiling.

Every process of a run compiles its jitted programs (the dense evaluation, the search step, the fine-tuning
step, ...) before it first runs them: seconds on a laptop CPU, minutes for a large model on a pod slice. A
run that starts again (resumed after a preemption, a kill or a Ctrl-C; rerun for the next stage; extracted
and fine-tuned by the other launch scripts) compiles the same programs again. With JAX's persistent cache
(docs.jax.dev, "Persistent compilation cache") the new process reads them from disk instead; the program it
runs is the same, so a resumed search stays bit for bit on its path.

Where the cache lives (`resolve`):
  `--compilation_cache=DIR`      that directory (or a URL such as gs://bucket/xla, which needs etils);
  `--compilation_cache=off`      no cache;
  unset                          `JAX_COMPILATION_CACHE_DIR` when set, else
                                 `$XDG_CACHE_HOME/spp_jax/xla/<machine>` (`~/.cache/...`).

`<machine>` is the processor architecture and a hash of the CPU's model and feature flags. XLA:CPU entries
are native code, and JAX's cache key names the device kind ("cpu") but not the CPU's features; two machines
that share a home directory but not a CPU model must not share entries.

JAX caches only programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s by default)
to compile, and it treats an entry it cannot read or write as a miss with a warning, so a broken cache never
fails a run. In a multi-process run only process 0 writes entries; every process reads them. The cache
directory is trusted: whoever can write to it can make your runs execute their code, so do not share it
with others.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

OFF = "off"


def _is_url(location: str) -> bool:
    return "://" in location


def machine_tag() -> str:
    """`<arch>-<12 hex>`: the processor architecture and a hash of the CPU model and its feature flags."""
    fields = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "flags", "Features", "CPU part") and line not in fields:
                fields.append(line)
    except OSError:  # not Linux: the platform's own description
        fields.append(platform.processor())
    digest = hashlib.sha256("\n".join(sorted(fields)).encode()).hexdigest()[:12]
    return f"{platform.machine() or 'unknown'}-{digest}"


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spp_jax" / "xla" / machine_tag()


def resolve(setting: str | None) -> str | None:
    """The cache location for a `--compilation_cache` value (module docstring), None for `off`.

    A URL (`gs://bucket/xla`, read through etils) is kept as given; a local path is expanded.
    """
    if setting == OFF:
        return None
    chosen = setting or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not chosen:
        return str(default_dir())
    return chosen if _is_url(chosen) else str(Path(chosen).expanduser())


def enable(setting: str | None = None) -> str | None:
    """Point JAX's persistent cache at `resolve(setting)` (or turn it off); call before the first compile.

    A local directory that cannot be created costs the cache, not the run: one warning line, then no cache.
    """
    import jax

    location = resolve(setting)
    if location is not None and not _is_url(location):
        try:
            Path(location).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(
                f"warning: compilation cache {location} cannot be created ({e.strerror or e}); running "
                "without it (give --compilation_cache=DIR with a writable DIR, or =off)",
                file=sys.stderr,
                flush=True,
            )
            location = None
    jax.config.update("jax_enable_compilation_cache", location is not None)
    if location is not None:
        jax.config.update("jax_compilation_cache_dir", location)
    return location
