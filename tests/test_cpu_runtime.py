"""The launch scripts re-execute themselves under tcmalloc on Linux (spp_jax/allocator.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spp_jax import allocator

ROOT = Path(__file__).resolve().parents[1]

# Imports the launch scripts' common module (which re-executes under tcmalloc) and prints what it ran with.
PROBE = f"""
import json, os, sys
sys.path.insert(0, {str(ROOT / "launch")!r})
import _common
env = {{k: os.environ.get(k) for k in ("LD_PRELOAD", "TCMALLOC_RELEASE_RATE")}}
print(json.dumps({{**env, "argv": sys.argv}}))
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
