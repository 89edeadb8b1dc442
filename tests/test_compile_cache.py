"""The launch scripts' persistent compilation cache (spp_jax/compile_cache.py).

Where it lives, that a second process reads the first one's programs, and that a cache directory that cannot
be made costs only the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spp_jax import compile_cache

ROOT = Path(__file__).resolve().parents[1]

# One process: enable the cache as the launch scripts do, count JAX's cache hits while compiling one program.
_PROBE = """
import sys
import jax, jax.numpy as jnp
from spp_jax import compile_cache
hits = []
jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e.endswith("/cache_hits") else None)
where = compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None)
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.arange(64.0).reshape(8, 8) / 64)
print(where, len(hits), float(y))
"""


def _probe(env: dict, *args: str) -> tuple[str, int, float, str]:
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    where, hits, value = r.stdout.split()
    return where, int(hits), float(value), r.stderr


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    e.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return e


def test_resolve_order(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    default = compile_cache.resolve(None)
    assert default == str(tmp_path / "xdg" / "spp_jax" / "xla" / compile_cache.machine_tag())
    assert compile_cache.resolve("") == default
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compile_cache.resolve(None) == str(tmp_path / "env")
    assert compile_cache.resolve(str(tmp_path / "flag")) == str(tmp_path / "flag")  # the flag beats the env
    assert compile_cache.resolve("gs://bucket/xla") == "gs://bucket/xla"  # a URL stays a URL
    assert compile_cache.resolve("~/c") == str(Path.home() / "c")
    assert compile_cache.resolve("off") is None


def test_machine_tag_names_the_architecture_and_is_stable():
    tag = compile_cache.machine_tag()
    arch, digest = tag.rsplit("-", 1)
    assert arch and len(digest) == 12 and int(digest, 16) >= 0
    assert compile_cache.machine_tag() == tag


def test_second_process_reads_the_first_ones_program(env, tmp_path):
    where, hits, first, _ = _probe(env)
    assert Path(where) == tmp_path / "xdg" / "spp_jax" / "xla" / compile_cache.machine_tag()
    entries = sorted(p.name for p in Path(where).iterdir())
    assert hits == 0 and entries  # compiled and written
    where2, hits2, second, _ = _probe(env)
    assert where2 == where and hits2 >= 1 and second == first
    assert sorted(p.name for p in Path(where).iterdir()) == entries  # nothing new written


def test_off_writes_nothing(env, tmp_path):
    where, hits, _, _ = _probe(env, "off")
    assert where == "None" and hits == 0
    assert not (tmp_path / "xdg").exists()


def test_a_directory_that_cannot_be_made_costs_only_the_cache(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    where, hits, value, stderr = _probe(env, str(blocker / "cache"))
    assert where == "None" and hits == 0 and value > 0
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: compilation cache")]
    assert len(warnings) == 1 and "--compilation_cache" in warnings[0], stderr[-2000:]
