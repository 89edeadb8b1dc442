"""A run moves between topologies: a path searched on 8 devices (mesh.fsdp=4) extracts and fine-tunes in a
process with 1 device, and a search started on 1 device resumes on 8. Every restore (resume state, path
arrays, models) reads onto the current devices, never onto the ones that saved it.

The 8-device side runs in this process (conftest: 8 fake CPU devices); the 1-device side in a subprocess
with `--xla_force_host_platform_device_count=1`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.vit import get_config
from spp_jax import checkpoint, run
from tests.helpers import write_synthetic_fashion_mnist
from tests.test_fsdp import assert_same_path

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

_ONE_DEVICE = """
import signal, sys
import jax
from configs.vit import get_config
from spp_jax import preemption, run
from spp_jax.errors import Preempted

assert jax.device_count() == 1, jax.devices()
cfg = get_config("mu")
cfg.data.data_dir = sys.argv[1]
run.run_all(cfg, sys.argv[2])  # extract + fine-tune + report of a path searched on 8 devices
stop = cfg.search.steps // 5  # then 20% of a search on this one device, stopped as by SIGTERM
preemption.stop_requested = lambda step: signal.SIGTERM if step == stop else None
try:
    run.run_all(cfg, sys.argv[3], until="search")
except Preempted:
    print("STOPPED", stop)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: the whole run on 8 devices (fsdp=4). B: A's workdir after its search, finished on 1 device.
    C: A's workdir after its dense stage, searched 20% on 1 device, then resumed on 8 (fsdp=4)."""
    idx = tmp_path_factory.mktemp("idx")
    write_synthetic_fashion_mnist(idx)
    tfds = tmp_path_factory.mktemp("tfds")
    root = tmp_path_factory.mktemp("topology")
    a, b, c = root / "a", root / "b", root / "c"
    mp = pytest.MonkeyPatch()
    mp.setenv("SPP_FASHION_MNIST_DIR", str(idx))
    cfg = get_config("mu")
    cfg.data.data_dir = str(tfds)
    cfg.mesh.fsdp = 4
    try:
        run.run_all(cfg, a, until="dense")
        shutil.copytree(a, c)
        run.run_all(cfg, a, until="search")
        shutil.copytree(a, b)
        report = run.run_all(cfg, a)
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
        one = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_ONE_DEVICE), str(tfds), str(b), str(c)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert one.returncode == 0, one.stderr[-3000:]
        stopped = checkpoint.ResumeStore(c / "search" / "resume", read_only=True).latest_step()
        resumed = run.run_all(cfg, c, until="search")  # on the 8 devices of this process
    finally:
        mp.undo()
    return {"cfg": cfg, "a": a, "b": b, "c": c, "report": report, "one": one, "stopped": stopped,
            "resumed": resumed}  # fmt: skip


def _json(path: Path):
    return json.loads(path.read_text())


def test_a_path_searched_on_8_devices_extracts_and_finetunes_on_1(runs):
    a, b, cfg = runs["a"], runs["b"], runs["cfg"]
    got = _json(b / "results" / "extract.json")["targets"]
    want = _json(a / "results" / "extract.json")["targets"]
    assert [t["target"] for t in got] == list(cfg.extract.targets)
    key = lambda t: (t["target"], t["dir"], t["params"], t["macs"], t["layers"])
    assert [key(t) for t in got] == [key(t) for t in want]
    for t in want:
        name = Path(t["dir"]).name
        spec = lambda wd, sub, name=name: _json(wd / sub / name / "arch_spec.json")
        assert spec(b, "extracted") == spec(a, "extracted")
        _, pa, _ = checkpoint.load_pruned(a / "extracted" / name)
        _, pb, _ = checkpoint.load_pruned(b / "extracted" / name)
        jax.tree.map(np.testing.assert_array_equal, pa, pb)  # the same slices of the same dense weights
        module, params, arch = checkpoint.load_pruned(b / "finetuned" / name)
        assert arch == spec(a, "finetuned")
        x = np.zeros((2, cfg.model.image_size, cfg.model.image_size, 3), np.float32)
        assert np.isfinite(np.asarray(module.apply({"params": params}, x))).all()
    report = _json(b / "report.json")
    assert [t["target"] for t in report["targets"]] == list(cfg.extract.targets)
    assert all(0 <= t["accuracy_finetuned"] <= 1 for t in report["targets"])


def test_the_8_device_run_finetuned_with_sharded_weights(runs):
    a, cfg = runs["a"], runs["cfg"]
    assert [t["target"] for t in runs["report"]["targets"]] == list(cfg.extract.targets)
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert any(str(r.get("stage", "")).startswith("finetune:") for r in rows)


def test_a_search_started_on_1_device_resumes_on_8_on_the_same_path(runs):
    stop = runs["cfg"].search.steps // 5
    assert f"STOPPED {stop}" in runs["one"].stdout
    assert runs["stopped"] == stop
    assert_same_path(runs["a"], runs["c"])
