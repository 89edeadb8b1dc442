"""A search killed at any moment resumes on the same path, bit for bit.

The `mu` search runs through `launch/train.py --until search` in a subprocess: once uninterrupted, then
again with 20 signals at moments spread over the search (mid-step, right after a path point was handed to
the async writer, i.e. while that point and the resume state after it are being written, and during
start-up), rerunning after each. Every stored path point of the interrupted run must equal the
uninterrupted run's (arrays bitwise, records exactly), and read back with its checksum. All runs share one
persistent compilation cache (`--compilation_cache`), which the uninterrupted run fills: the restarted
processes run the programs it compiled. SIGTERM must save a resume state and exit 0 within seconds. A
copied workdir resumes from another directory on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.vit import get_config
from spp_jax import checkpoint, run
from tests.helpers import tree_snapshot, write_synthetic_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
KILLS = 20

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    idx = tmp_path_factory.mktemp("idx")
    write_synthetic_fashion_mnist(idx)
    tfds_dir = tmp_path_factory.mktemp("tfds")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", SPP_FASHION_MNIST_DIR=str(idx))
    return env, tfds_dir


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache")


def _cmd(workdir: Path, tfds_dir: Path, xla_cache: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "vit.py:mu"),
        f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}", f"--config.search.steps={STEPS}",
        "--until=search", f"--compilation_cache={xla_cache}",
    ]  # fmt: skip


def _rows(workdir: Path, since: float) -> list[dict]:
    """metrics.jsonl rows written after `since` (older rows belong to an earlier, killed process)."""
    f = workdir / "metrics.jsonl"
    out = []
    for line in f.read_text().splitlines() if f.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        if row.get("time", 0) >= since:
            out.append(row)
    return out


def _signal_at(cmd, env, workdir: Path, moment: tuple, sig: int, log) -> int:
    """Start the run, send `sig` at `moment`, return the exit status."""
    kind, step, delay = moment
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        if kind == "startup":
            time.sleep(delay)
        else:
            stage = "search" if kind == "step" else "path"
            while proc.poll() is None and not any(
                r["stage"] == stage and r["step"] >= step for r in _rows(workdir, t0)
            ):
                time.sleep(0.002)
            time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def _moments(seed: int) -> list[tuple]:
    """20 moments over the search: 2 during start-up, the rest alternating mid-step and mid-save."""
    rng = np.random.default_rng(seed)
    steps = np.linspace(3, STEPS - 8, KILLS - 2).round().astype(int)
    out = [("startup", 0, float(rng.uniform(0.3, 3.0))) for _ in range(2)]
    for i, s in enumerate(steps):
        out.append(("step", int(s), float(rng.uniform(0, 0.08))) if i % 2 else ("save", int(s), 0.0))
    return out


def _assert_same_path(ref: Path, got: Path) -> None:
    a = checkpoint.PathStore(ref / "search" / "path", read_only=True)
    b = checkpoint.PathStore(got / "search" / "path", read_only=True)
    assert a.steps() == b.steps() and a.steps()[-1] == STEPS
    for s in a.steps():  # every point reads back (checksum verified) and equals the uninterrupted run's
        jax.tree.map(np.testing.assert_array_equal, a.arrays(s), b.arrays(s))
        assert a.record(s) == b.record(s)
    leftovers = [p for p in (got / "search").rglob("*") if "orbax-checkpoint-tmp" in p.name]
    assert not leftovers
    assert checkpoint.ResumeStore(got / "search" / "resume", read_only=True).latest_step() == STEPS


@pytest.fixture(scope="module")
def reference(data_env, xla_cache, tmp_path_factory):
    env, tfds_dir = data_env
    wd = tmp_path_factory.mktemp("ref") / "wd"
    subprocess.run(_cmd(wd, tfds_dir, xla_cache), env=env, check=True, capture_output=True, timeout=300)
    assert any(xla_cache.iterdir())  # the run wrote its programs where --compilation_cache said
    return wd


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_signalled_20_times_resumes_to_the_same_path(reference, data_env, xla_cache, tmp_path, sig):
    env, tfds_dir = data_env
    wd = tmp_path / "wd"
    cmd = _cmd(wd, tfds_dir, xla_cache)
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGINT
    with open(tmp_path / "stderr.log", "wb") as log:
        codes = [_signal_at(cmd, env, wd, m, sig, log) for m in _moments(int(sig))]
    text = (tmp_path / "stderr.log").read_text()
    assert "Traceback" not in text, text[-3000:]
    assert codes == [expected] * KILLS, codes  # every signal landed before the search finished
    if sig == signal.SIGINT:  # stopped at the end of a step with a resume state, or before the run started
        assert text.count("rerun the same command to continue") == KILLS
    else:  # the case that once stranded a workdir: points written after the last resume state
        assert text.count("replaced path points") >= 3
    assert not (wd / "results" / "search.json").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_path(reference, wd)


def test_sigterm_saves_a_resume_state_and_exits_0(reference, data_env, xla_cache, tmp_path):
    env, tfds_dir = data_env
    wd = tmp_path / "wd"
    cmd = _cmd(wd, tfds_dir, xla_cache)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not any(r["stage"] == "search" and r["step"] >= 23 for r in _rows(wd, t0)):
        assert proc.poll() is None
        time.sleep(0.002)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert time.time() - sent < 5.0
    last = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM at search step" in last and "Traceback" not in err
    stopped_at = int(last.split("search step ")[1].split()[0])
    assert 23 <= stopped_at < STEPS
    resume = checkpoint.ResumeStore(wd / "search" / "resume", read_only=True)
    assert resume.latest_step() == stopped_at  # saved on the way out, not the last cadence state
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"resumed at step {stopped_at}" in done.stderr
    _assert_same_path(reference, wd)


def test_copied_workdir_resumes_from_elsewhere_without_touching_the_original(data_env, tmp_path, monkeypatch):
    env, tfds_dir = data_env
    monkeypatch.setenv("SPP_FASHION_MNIST_DIR", env["SPP_FASHION_MNIST_DIR"])
    cfg = get_config("mu")
    cfg.data.data_dir = str(tfds_dir)
    cfg.extract.targets = ("params:0.5",)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    run.run_all(cfg, "wd", until="extract")  # a relative workdir, as a user types it
    extracted = json.loads(Path("wd/results/extract.json").read_text())["targets"][0]
    assert extracted["dir"] == "extracted/params_0.5"
    shutil.copytree(tmp_path / "a" / "wd", tmp_path / "b" / "copy")
    before = tree_snapshot(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    report = run.run_all(cfg, "b/copy")  # resumed from another current directory
    assert tree_snapshot(tmp_path / "a") == before  # the original is untouched
    meta = json.loads((tmp_path / "b/copy/finetuned/params_0.5/meta.json").read_text())
    assert meta["finetuned_from"] == "extracted/params_0.5"
    assert report["targets"][0]["dir"] == "extracted/params_0.5"
    checkpoint.load_pruned(tmp_path / "b/copy/finetuned/params_0.5")
