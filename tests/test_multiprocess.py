"""Several processes (jax.distributed): the `mu` search run as 2 processes x 4 CPU devices (local
coordinator, gloo collectives) stores the path of a 1-process run on 8 devices, through an interruption
and a resume.

The global batches are the same for any process count (each process reads its rows of every global
batch, and only those: tested on the loaders directly), so the two runs compute the same steps; only the
order in which the gradient's all-reduce adds the devices' parts differs (in-process vs gloo). The path
points, the entry steps (t_in), the steps in support and the support per group are therefore equal
exactly, and Gamma, Z and the masks to float rounding. The 2-process run is stopped by a SIGINT to
process 1 (turned into JAX's preemption notice: both processes stop after the same step with a resume
state) and resumed through the library entry point; both processes then see the same finished
checkpoint, and one process wrote every JSON and metrics row.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from spp_jax import checkpoint
from spp_jax.data import make_loader
from spp_jax.data.text import make_record_loader
from spp_jax.distributed import check_args
from spp_jax.errors import ConfigError
from tests.helpers import write_synthetic_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # processes and whole runs: the full suite, not the fast tier
STEPS = 12  # configs/vit.py:mu
_CLUSTER_ENV = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


# ----------------------------------------------------------------------------- each process's data


class _Recording(list):
    """A list source that records which indices were read."""

    def __init__(self, items):
        super().__init__(items)
        self.read: set[int] = set()

    def __getitem__(self, i):
        self.read.add(int(i))
        return super().__getitem__(i)


def _images(n: int) -> _Recording:
    rng = np.random.default_rng(0)
    return _Recording(
        {"image": rng.integers(0, 255, (12, 12, 1), dtype=np.uint8), "label": np.int32(i)} for i in range(n)
    )


def _batches(it) -> list[dict]:
    return [{k: np.asarray(v) for k, v in b.items()} for b in it]


def test_each_process_reads_only_its_rows_of_every_global_batch():
    """Process i of 2 reads rows [4i, 4i + 4) of each global batch of 8 (augmentation included) and
    no other example; the two processes' batches side by side are the one-process batches."""
    kw = dict(global_batch_size=8, image_size=8, train=True, seed=3, num_epochs=1, augment=True,
              read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))  # fmt: skip
    one = _batches(make_loader(_images(40), **kw))
    sources = [_images(40), _images(40)]
    per = [_batches(make_loader(s, process_index=i, process_count=2, **kw)) for i, s in enumerate(sources)]
    assert len(one) == len(per[0]) == len(per[1]) == 5
    for g, a, b in zip(one, *per, strict=True):
        assert a["label"].shape == b["label"].shape == (4,)
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), g[key])
    for i, s in enumerate(sources):  # the examples a process reads are the ones it yields
        assert s.read == set(np.concatenate([b["label"] for b in per[i]]).tolist())
    assert not sources[0].read & sources[1].read and sources[0].read | sources[1].read == set(range(40))

    records = [{"tokens": np.arange(3) + 10 * i} for i in range(20)]
    convert = lambda e: {"tokens": np.asarray(e["tokens"], np.int32)}
    take = lambda it: [next(it)["tokens"] for _ in range(7)]  # past the first epoch
    one = take(make_record_loader(records, 4, 5, convert=convert))
    per = [take(make_record_loader(records, 4, 5, convert=convert, process_index=i, process_count=2))
           for i in range(2)]  # fmt: skip
    for g, a, b in zip(one, *per, strict=True):
        np.testing.assert_array_equal(np.concatenate([a, b]), g)


def test_process_flags_are_checked_before_anything_starts(tmp_path):
    for args, match in [
        (("h:1", 2, None), "--num_processes is given without --process_id"),
        ((None, None, 0), "--process_id is given without --num_processes"),
        (("h:1", 2, 2), r"--process_id=2 is not in \[0, 2\)"),
        (("h:1", 0, 0), "--num_processes=0 must be at least 1"),
        (("localhost", 2, 0), "is not host:port"),
        (("h:99999", 2, 0), "is not host:port"),
    ]:
        with pytest.raises(ConfigError, match=match):
            check_args(*args)
    check_args("10.0.0.2:8476", 2, 1)
    check_args("[::1]:8476", 2, 0)
    check_args(None, None, None)  # a cluster's environment provides them
    env = _env(devices=1)
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "vit.py:mu"),
           f"--workdir={tmp_path / 'wd'}", "--distributed"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no cluster to take the ") and "--num_processes=N --process_id=i" in last
    assert "Traceback" not in out.stderr and not (tmp_path / "wd").exists()


# ----------------------------------------------------------------------------- the 2-process search


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_ENV)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(workdir: Path, tfds_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "vit.py:mu"),
        f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}", "--until=search", *extra,
    ]  # fmt: skip


# The library entry point, as a program would use it: start jax.distributed, run, then report what this
# process sees of the finished checkpoint.
_DRIVER = """
import json, sys
from spp_jax import distributed
distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from configs.vit import get_config
from spp_jax import checkpoint, run
cfg = get_config("mu")
cfg.data.data_dir = sys.argv[4]
run.run_all(cfg, sys.argv[3], until="search")
paths = checkpoint.PathStore(sys.argv[3] + "/search/path", read_only=True)
resume = checkpoint.ResumeStore(sys.argv[3] + "/search/resume", read_only=True)
view = {"points": {s: paths.record(s)["checksum"] for s in paths.steps()}, "resume": resume.latest_step()}
json.dump(view, open(sys.argv[5], "w"))
"""


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; once one process fails the others are killed (they would wait for it in a collective)."""
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.wait() for p in procs]


def _search_rows(workdir: Path) -> list[int]:
    f = workdir / "metrics.jsonl"
    steps = []
    for line in f.read_text().splitlines() if f.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        if row.get("stage") == "search":
            steps.append(row["step"])
    return steps


@pytest.mark.slow
def test_two_processes_store_the_one_process_path_through_a_resume(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    write_synthetic_fashion_mnist(idx)
    tfds_dir = tmp_path / "tfds"
    ref, wd = tmp_path / "ref", tmp_path / "wd"

    # 1 process, 8 devices (it also prepares the tfds data the two processes then share)
    out = subprocess.run(_train_cmd(ref, tfds_dir), env=_env(8, SPP_FASHION_MNIST_DIR=str(idx)),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]

    # 2 processes x 4 devices, stopped by a SIGINT to process 1 once the search is past step 4
    env = _env(4, SPP_FASHION_MNIST_DIR=str(idx))
    addr = f"127.0.0.1:{_free_port()}"
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        flags = (f"--coordinator_address={addr}", "--num_processes=2", f"--process_id={i}")
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(_train_cmd(wd, tfds_dir, *flags), env=env, stderr=log,
                                          stdout=subprocess.DEVNULL))  # fmt: skip
    deadline = time.time() + 300
    while max(_search_rows(wd), default=0) < 4 and all(p.poll() is None for p in procs):
        assert time.time() < deadline
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGINT)
    codes = _wait_all(procs, 300)
    texts = [f.read_text() for f in logs]
    assert codes == [0, 0], [t[-3000:] for t in texts]
    stops = [t.strip().splitlines()[-1] for t in texts]
    assert all("stopped by SIGTERM at search step" in s for s in stops), stops
    stopped_at = {int(s.split("search step ")[1].split()[0]) for s in stops}
    assert len(stopped_at) == 1  # both after the same step
    k = stopped_at.pop()
    assert 4 <= k < STEPS
    assert checkpoint.ResumeStore(wd / "search" / "resume", read_only=True).latest_step() == k
    assert not (wd / "results" / "search.json").exists()

    # resumed through the library entry point; each process reports what it sees of the checkpoint
    addr = f"127.0.0.1:{_free_port()}"
    views = [tmp_path / f"view{i}.json" for i in range(2)]
    logs = [tmp_path / f"r{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-c", _DRIVER, addr, str(i), str(wd), str(tfds_dir), str(views[i])]
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=log, stdout=subprocess.DEVNULL))
    codes = _wait_all(procs, 300)
    texts += [f.read_text() for f in logs]
    assert codes == [0, 0], [t[-3000:] for t in texts[2:]]
    assert f"resumed at step {k}" in texts[2]
    for t in texts:
        assert "Traceback" not in t and "StepAlreadyExistsError" not in t, t[-3000:]
    seen = [json.loads(v.read_text()) for v in views]
    assert seen[0] == seen[1] and seen[0]["resume"] == STEPS  # the same finished checkpoint

    # the path: same points, entry steps, steps in support and supports; float state to rounding
    a = checkpoint.PathStore(ref / "search" / "path", read_only=True)
    b = checkpoint.PathStore(wd / "search" / "path", read_only=True)
    assert a.steps() == b.steps() and a.steps()[-1] == STEPS and len(a.steps()) > 4
    assert list(seen[0]["points"]) == [str(s) for s in b.steps()]
    for s in a.steps():
        x, y = a.arrays(s), b.arrays(s)  # checksums verified
        jax.tree.map(np.testing.assert_array_equal, x["t_in"], y["t_in"])
        jax.tree.map(np.testing.assert_array_equal, x["steps_in_support"], y["steps_in_support"])
        for key in ("gamma", "z", "masks"):
            jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), x[key], y[key])
        ra, rb = a.record(s), b.record(s)
        assert ra["support"] == rb["support"] and ra["batch_accuracy"] == rb["batch_accuracy"]
        assert ra.get("accuracy") == rb.get("accuracy")
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)

    # one writer: every search step logged once, the stage result written once the search finished
    assert _search_rows(wd) == list(range(1, STEPS + 1))
    assert json.loads((wd / "results" / "search.json").read_text())["points"] == b.steps()
    assert not [p for p in (wd / "search").rglob("*") if "orbax-checkpoint-tmp" in p.name]
