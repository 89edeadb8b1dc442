"""Run the launch scripts under tcmalloc on Linux: with glibc, XLA:CPU's step buffers fault in every page.

XLA:CPU allocates every buffer of a step (activations, cotangents: gigabytes for a ViT-S/16 search step at
batch 64) with malloc and frees it at the step's end. glibc serves such large blocks with fresh mmaps, so the
kernel zero-fills the step's whole working set again at every step: ~680,000 minor page faults and ~2 s of
system time per 65-token ViT-S/16 search step on a 2-core CPU. tcmalloc keeps freed memory for reuse; with
TCMALLOC_RELEASE_RATE=0 (never hand it back to the OS, so the process's resident size stays at its peak) the
same step faults no page at all; the 65-token search and fine-tuning steps ran ~1/3 faster
(bench/README.md, the peer benchmark section).

An allocator can only be chosen before the process starts, so `use_tcmalloc()` re-executes the current
command once with LD_PRELOAD set, when the library is installed (Debian/Ubuntu: libtcmalloc-minimal4, which
setup.sh installs). It does nothing when LD_PRELOAD already names an allocator, on other systems, when
tcmalloc is missing, or with SPP_JAX_TCMALLOC=0.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

_MARK = "SPP_JAX_TCMALLOC_EXEC"  # set in the re-executed process: never re-execute twice


def tcmalloc_library() -> str | None:
    """The soname of the installed tcmalloc (minimal build preferred), or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        lib = ctypes.util.find_library(name)
        if lib:
            return lib
    return None


def use_tcmalloc() -> None:
    """Re-execute this Python command under tcmalloc (module docstring), or return and change nothing."""
    env = os.environ
    if (
        not sys.platform.startswith("linux")
        or env.get("SPP_JAX_TCMALLOC", "1") == "0"
        or env.get(_MARK)
        or "malloc" in env.get("LD_PRELOAD", "")
    ):
        return
    lib = tcmalloc_library()
    if lib is None:
        return
    new = dict(env)
    new[_MARK] = "1"
    new["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    new.setdefault("TCMALLOC_RELEASE_RATE", "0")
    new.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))  # no "large alloc" lines on stderr
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], new)  # interpreter options kept
