"""The CPU runtime settings of the launch scripts: tcmalloc re-execution and the steps' compiler options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from spp_jax import allocator, compile_options
from spp_jax.adapters import ViTAdapter
from spp_jax.models.vit import vit_config
from spp_jax.search import init_search_state, make_search_step
from spp_jax.spp import spp
from spp_jax.tasks.image_classification import ImageClassification

ROOT = Path(__file__).resolve().parents[1]

# Imports the launch scripts' common module (which re-executes under tcmalloc) and prints what it ran with.
PROBE = f"""
import json, os, sys
sys.path.insert(0, {str(ROOT / "launch")!r})
import _common
print(json.dumps({{k: os.environ.get(k) for k in ("LD_PRELOAD", "TCMALLOC_RELEASE_RATE")}} | {{"argv": sys.argv}}))
"""


def _probe(tmp_path, **env) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator._MARK)}
    out = subprocess.run(
        [sys.executable, str(script), "x", "--y=1"], env={**full, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or allocator.tcmalloc_library() is None, reason="no tcmalloc here"
)
def test_launch_scripts_rerun_under_tcmalloc(tmp_path):
    got = _probe(tmp_path)
    assert allocator.tcmalloc_library() in got["LD_PRELOAD"].split(":")
    assert got["TCMALLOC_RELEASE_RATE"] == "0"
    assert got["argv"][1:] == ["x", "--y=1"]  # the same command, arguments kept


def test_tcmalloc_opt_out_and_user_allocator_win(tmp_path):
    assert _probe(tmp_path, SPP_JAX_TCMALLOC="0")["LD_PRELOAD"] is None
    # a preloaded allocator of the user's own is left alone (the name only needs to say "malloc")
    fake = tmp_path / "libmy_malloc.so"
    fake.write_bytes(b"")
    got = _probe(tmp_path, LD_PRELOAD=str(fake))
    assert got["LD_PRELOAD"] == str(fake) and got["TCMALLOC_RELEASE_RATE"] is None


@pytest.fixture
def fresh_options():
    compile_options.step_compiler_options.cache_clear()
    yield
    compile_options.step_compiler_options.cache_clear()


def test_compiler_options_on_cpu(fresh_options, monkeypatch):
    monkeypatch.delenv("SPP_JAX_CPU_OPTIONS", raising=False)
    assert compile_options.step_compiler_options() == compile_options.CPU_STEP_OPTIONS
    compile_options.step_compiler_options.cache_clear()
    monkeypatch.setenv("SPP_JAX_CPU_OPTIONS", "0")
    assert compile_options.step_compiler_options() == {}


def test_compiler_options_yield_to_xla_flags_and_to_rejection(fresh_options, monkeypatch):
    (name,) = compile_options.CPU_STEP_OPTIONS
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + f" --{name}=LIBRARY_FUSION_TYPE_DOT")
    assert compile_options.step_compiler_options() == {}
    compile_options.step_compiler_options.cache_clear()
    monkeypatch.delenv("XLA_FLAGS")
    # an option this jaxlib does not know: the steps compile with the defaults instead of failing
    monkeypatch.setattr(compile_options, "CPU_STEP_OPTIONS", {"xla_cpu_no_such_option_here": "1"})
    assert compile_options.step_compiler_options() == {}


def test_search_step_with_options_equals_defaults(fresh_options):
    """The options change how XLA:CPU fuses the step, not what it computes."""
    adapter = ViTAdapter(vit_config("mu", num_classes=5))
    params = adapter.module().init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
    params["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(1), params["head"]["kernel"].shape)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32), "label": np.arange(4) % 5}
    spec, tx = adapter.mask_spec(), spp("official", learning_rate=0.05, lam=0.9)
    step = make_search_step(adapter.module().apply, spec, tx, task=ImageClassification())
    options = compile_options.step_compiler_options()
    if not options:
        pytest.skip("this jaxlib takes none of the CPU options")
    states = []
    for opts in ({}, options):
        fn, state = jax.jit(step, compiler_options=opts), init_search_state(spec, tx)
        for _ in range(3):
            state, _ = fn(state, params, batch)
        states.append(state)
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert float(np.abs(np.asarray(states[0].masks["mlp"]) - 1.0).max()) > 0  # the masks did move
