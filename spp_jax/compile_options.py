"""XLA compiler options for the search and fine-tuning steps, per backend.

On the CPU backend, jaxlib 0.10 hands dots AND the elementwise work around them (LayerNorm backward,
softmax, GELU) to YNNPACK fusions. For the masks-only backward pass of the search step those fused
elementwise kernels are slow at ViT sizes: a ViT-S/16 search step at batch 64 and 65 tokens took 5.9 s with
XLA's defaults and 4.3 s with YNNPACK used for the dots only (fine-tuning step 7.6 s -> 5.9 s), while the
17-token and SmolLM2 steps did not change beyond the noise (bench/README.md, "CPU compiler options").
So on CPU the steps are compiled with YNNPACK fusions of dots only (`LIBRARY_FUSION_TYPE_DOT`).

The option is passed per `jax.jit` (`compiler_options`), not through XLA_FLAGS: a jaxlib that does not know
it rejects it with an exception here, and the steps then compile with the defaults (an unknown flag in
XLA_FLAGS aborts the process instead). A user's own XLA_FLAGS setting of the same flag wins, and
SPP_JAX_CPU_OPTIONS=0 turns the options off.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

CPU_STEP_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def step_compiler_options() -> dict[str, str]:
    """The options `jax.jit(step, compiler_options=...)` gets on this process's default backend."""
    if jax.default_backend() != "cpu" or os.environ.get("SPP_JAX_CPU_OPTIONS", "1") == "0":
        return {}
    user = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in CPU_STEP_OPTIONS.items() if f"--{k}" not in user}
    if not options:
        return {}
    try:  # this jaxlib knows the options (they are DebugOptions fields, not a stable API)
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros(())).compile()
    except Exception:  # any rejection means: compile with the defaults
        return {}
    return options
