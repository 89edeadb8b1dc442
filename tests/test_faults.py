"""Two faults a run must survive: a second run on a live workdir, and a full disk during a save.

The disk fills up through an audit hook on Python's `open` (`os.open`, `builtins.open`, orbax's JSON and
metadata writers, `tempfile`): while armed, every write-open under a path prefix raises
`OSError(ENOSPC)`, as a full disk does, in whichever thread orbax writes from. The arrays themselves are
written by tensorstore (C++), which a hook cannot reach; its ENOSPC error text, taken from a real full
tmpfs, is checked to read as a full disk too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from configs.vit import get_config
from spp_jax import checkpoint, run
from spp_jax.errors import SaveFailed, WorkdirInUse, save_failed
from tests.helpers import tree_snapshot

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier


@pytest.fixture()
def cfg(idx_dir, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPP_FASHION_MNIST_DIR", str(idx_dir))
    c = get_config("mu")
    c.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
    c.extract.targets = ("params:0.5",)
    c.search.eval_points = False
    return c


# -- a second run on a live workdir ------------------------------------------------------------------------

_HOLDER = """
import sys, time
from spp_jax.workdir import Workdir
wd = Workdir(sys.argv[1]).create()
with wd.lock():
    wd.sign_lock()
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_live_workdir_is_refused_and_a_killed_one_leaves_no_lock(cfg, idx_dir, tmp_path):
    wd = tmp_path / "wd"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", SPP_FASHION_MNIST_DIR=str(idx_dir))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(wd)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_snapshot(wd)
        with pytest.raises(WorkdirInUse, match=rf"in use by a running run \(pid {holder.pid} on host "):
            run.run_all(cfg, wd)  # (also prepares the dataset, whose progress bars would add lines below)
        second = subprocess.run(
            [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs/vit.py:mu"),
             f"--workdir={wd}", f"--config.data.data_dir={cfg.data.data_dir}"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        lines = [ln for ln in (second.stdout + second.stderr).splitlines() if ln.strip()]
        assert second.returncode == 1 and len(lines) == 1, second.stderr[-3000:]
        busy = f"error: workdir {wd} is in use by a running run (pid {holder.pid} on host "
        assert lines[0].startswith(busy)
        assert lines[0].endswith("; wait for it to end (or stop it), or give another --workdir")
        assert tree_snapshot(wd) == before  # the live run's files are untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    run.run_all(cfg, wd, until="dense")  # the killed run's lock went with it: no stale lock
    assert (wd / "results" / "dense.json").exists()
    assert f'"pid": {os.getpid()}' in (wd / ".lock").read_text()  # this run signed the lock


# -- a full disk during a save -----------------------------------------------------------------------------

_full_under: list[str] = []  # while non-empty: write-opens under this path prefix fail with ENOSPC


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _full_under or not str(args[0]).startswith(_full_under[0]):
        return
    mode, flags = args[1], args[2]
    if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    ):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))


if not getattr(sys, "_spp_jax_fault_hook", False):  # audit hooks cannot be removed: install one, once
    sys.addaudithook(_audit)
    sys._spp_jax_fault_hook = True


@contextlib.contextmanager
def disk_full_under(prefix: Path) -> Iterator[None]:
    _full_under.append(str(prefix))
    try:
        yield
    finally:
        _full_under.clear()


def _fails_in_one_line(cfg, wd: Path, full: Path, what: str) -> None:
    with disk_full_under(full), pytest.raises(SaveFailed) as e:
        run.run_all(cfg, wd, until="extract")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (
        f"disk full while saving {what} (No space left on device); free space on that disk, then rerun "
        "the same command to resume (everything saved before is intact)"
    )


def _points(wd: Path) -> list[int]:
    """The stored path points, every one read back (checksum verified)."""
    with checkpoint.PathStore(wd / "search" / "path", read_only=True) as paths:
        for s in paths.steps():
            paths.arrays(s)
        return paths.steps()


# a failed save leaves orbax's other writes of that save to finish on a closed event loop, which Python
# reports as unraisable errors (launch/_common.py drops them from the CLI's output)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_while_saving_stops_in_one_line_keeps_earlier_saves_and_a_rerun_resumes(
    cfg, tmp_path, capfd
):
    wd = tmp_path / "wd"
    _fails_in_one_line(cfg, wd, wd / "dense", f"the model to {wd / 'dense'}")
    assert not checkpoint.is_complete_model(wd / "dense") and not (wd / "results" / "dense.json").exists()

    _fails_in_one_line(cfg, wd, wd / "search" / "path" / "8.", f"path point 8 to {wd / 'search' / 'path'}")
    checkpoint.load_pruned(wd / "dense")  # saved by the rerun, intact
    before = _points(wd)
    assert before and max(before) < 8

    resume = wd / "search" / "resume"
    _fails_in_one_line(cfg, wd, resume / "10.", f"resume state 10 to {resume}")
    assert "[search] resumed at step 5" in capfd.readouterr().err
    assert set(before) < set(_points(wd))  # the points the replay saved before that state are kept
    assert checkpoint.ResumeStore(resume, read_only=True).steps() == [5]

    model = wd / "extracted" / "params_0.5"
    _fails_in_one_line(cfg, wd, model, f"the model to {model}")
    assert _points(wd)[-1] == cfg.search.steps and not checkpoint.is_complete_model(model)

    run.run_all(cfg, wd, until="extract")  # space is back: the same call finishes
    assert (wd / "results" / "extract.json").exists()
    checkpoint.load_pruned(model)
    assert _points(wd)[-1] == cfg.search.steps
    leftovers = [p for p in wd.rglob("*") if "orbax-checkpoint-tmp" in p.name or ".json." in p.name]
    assert not leftovers  # no temporary directory or JSON file of a failed save is left behind


def test_tensorstore_and_os_write_errors_read_as_a_full_disk_or_a_failed_write():
    # tensorstore's text when a tmpfs of 1 MiB filled up during an orbax array save
    real = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local file "/mnt/ps/2.orbax-checkpoint-'
        'tmp/state/ocdbt.process_0/": Failed writing: "/mnt/ps/2/d/19b0": Failed to write 444557 bytes to '
        "file 4: No space left on device [os_error_code='28']"
    )
    assert str(save_failed("path point 2 to ps", real)).startswith(
        "disk full while saving path point 2 to ps (No space left on device); free space on that disk"
    )
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert str(save_failed("x", quota)).startswith(f"disk full while saving x ({os.strerror(errno.EDQUOT)})")
    denied = PermissionError(errno.EACCES, "Permission denied", "/wd/run.json")
    assert str(save_failed("x", denied)).startswith("cannot save x (Permission denied); fix that")
    assert save_failed("x", ValueError("bad pytree")) is None  # not a write failure: raised as it is
