"""A run's directory: layout, fingerprint, finished-stage results and workdir-relative paths.

    config.json           the run's config          run.json       fingerprint (model, masks, data, search)
    metrics.jsonl         per-step metrics          results/       one JSON per finished stage
    dense/                dense task model (params/ + arch_spec.json)
    search/path/          orbax path points (Gamma, Z, M, t_in, steps in support + metrics record)
    search/resume/        orbax resume states (search state + data iterator position)
    extracted/<target>/   pruned models before fine-tuning     finetuned/<target>/  after fine-tuning
    discarded/<time>/     what `--fresh_search` moved aside (never deleted by spp_jax)
    report.json, report.md, path.png, accuracy_vs_params.png

Every path stored inside the workdir (results, model metadata) is relative to the workdir, so a workdir
can be moved or copied and resumed from any current directory; a copy never touches the original.

A training run holds `.lock` (an fcntl.flock, `Workdir.lock`): a second run on the same workdir is refused
in one line naming the holder's pid and host. The kernel drops the lock when its process ends in any way
(kill -9 included), so there is no stale lock to clean up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from spp_jax import checkpoint, distributed
from spp_jax.errors import CheckpointMismatch, ConfigError, SPPError, WorkdirInUse, saving
from spp_jax.progress import MetricWriter, log

# Fingerprint sections a new search may change (with --fresh_search, or freely while the search has no
# progress); any other difference means another model or data, and the workdir is refused.
SEARCH_KEYS = ("search", "seed")
# Everything derived from the search: moved aside by a fresh search.
_SEARCH_OUTPUTS = ("search", "extracted", "finetuned", "report.json", "report.md", "path.png",
                   "accuracy_vs_params.png", "perplexity_vs_params.png")  # fmt: skip
_SEARCH_RESULTS = ("search", "extract", "finetune", "evaluate")
_DIFF_ORDER = ("model", "data", "mask_spec")  # fingerprint sections in the order a mismatch names them
LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # workdirs this process has locked -> the lock file's descriptor


class Workdir:
    """`Workdir(path)` names the directory; `create()` makes it once the run is known to be valid."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics = MetricWriter(self.path)

    def create(self) -> Workdir:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"workdir {self.path} is a file, not a directory; give another --workdir")
        with saving(f"the workdir {self.path}"):
            self.path.mkdir(parents=True, exist_ok=True)
        return self

    # -- one run at a time ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the workdir's lock for the block, or raise `WorkdirInUse` if a live run holds it.

        An exclusive `fcntl.flock` on WORKDIR/.lock, which the kernel releases when the process ends
        (kill -9 included). It only opens the file: `sign_lock` writes this run's pid and host into it
        once the run is known to be valid, so a refused run leaves the workdir as it was. Process 0 locks
        for a multi-process run (its processes share the workdir) and tells the others the outcome. The
        lock is re-entrant within one process.
        """
        key = self.path.absolute()
        mine = jax.process_index() == 0 and key not in _held
        refused = None
        if mine:
            try:
                _held[key] = self._take_lock()
            except SPPError as e:
                refused, mine = e, False
        if jax.process_count() > 1:  # every process learns whether process 0 got the lock
            from jax.experimental import multihost_utils

            if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)) and refused is None:
                refused = WorkdirInUse(
                    f"workdir {self.path} is in use by a running run; wait for it to end, or give another "
                    "--workdir"
                )
        if refused is not None:
            raise refused
        try:
            yield
        finally:
            if mine:
                os.close(_held.pop(key))  # releases the lock

    def _take_lock(self) -> int:
        f = self.path / LOCK_FILE
        with saving(f"the lock file {f}"):
            fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock on this filesystem
                log(f"[run] cannot lock {f} ({os.strerror(e.errno)}); not guarding against a second run")
                return fd
            os.close(fd)
            raise WorkdirInUse(
                f"workdir {self.path} is in use by a running run{_holder(f)}; wait for it to end (or stop "
                "it), or give another --workdir"
            ) from None
        return fd

    def sign_lock(self) -> None:
        """Write this process's pid and host into the held lock file (named when another run is refused)."""
        fd = _held.get(self.path.absolute())
        if fd is not None:
            text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
            with saving(f"the lock file {self.path / LOCK_FILE}"):
                os.ftruncate(fd, 0)
                os.pwrite(fd, text.encode() + b"\n", 0)

    # -- paths ------------------------------------------------------------------------------------------

    def rel(self, path: str | os.PathLike) -> str:
        """`path` relative to the workdir when it lies inside it (posix), else absolute."""
        p = Path(path).absolute()
        try:
            return p.relative_to(self.path.absolute()).as_posix()
        except ValueError:
            return str(p)

    def resolve(self, stored: str) -> Path:
        """A path read from a workdir file (relative to the workdir, or absolute)."""
        return self.path / stored

    # -- finished stages --------------------------------------------------------------------------------

    def result(self, stage: str) -> dict | None:
        f = self.path / "results" / f"{stage}.json"
        if not f.exists():
            return None
        try:
            out = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointMismatch(
                f"{f} is not readable JSON ({type(e).__name__}); delete it to redo the {stage} stage"
            ) from None
        if not isinstance(out, dict):
            raise CheckpointMismatch(
                f"{f} does not hold a result object; delete it to redo the {stage} stage"
            )
        return out

    def save_result(self, stage: str, result: dict) -> None:
        if jax.process_index() == 0:
            checkpoint.write_json_atomic(self.path / "results" / f"{stage}.json", result)

    # -- fingerprint ------------------------------------------------------------------------------------

    def has_search_progress(self) -> bool:
        """True once the search stored a path point or a resume state."""
        for sub in ("path", "resume"):
            d = self.path / "search" / sub
            if d.is_dir() and any(_is_step_dir(p) for p in d.iterdir()):
                return True
        return False

    def check_fingerprint(self, fingerprint: dict, fresh_search: bool = False) -> None:
        """Refuse a workdir of another run; name the first differing key and both values.

        A changed search setting (`SEARCH_KEYS`) is taken when the old search has no progress yet (e.g.
        it stopped on a NaN loss at its first steps), or with `fresh_search`, which first moves the old
        search and everything derived from it to `discarded/<time>/`. With several processes, process 0
        writes and moves, and every process returns once it has.
        """
        self._check_fingerprint(fingerprint, fresh_search)
        distributed.barrier("spp_jax:workdir_checked")

    def _check_fingerprint(self, fingerprint: dict, fresh_search: bool) -> None:
        f = self.path / "run.json"
        if not f.exists():
            if jax.process_index() == 0:
                checkpoint.write_json_atomic(f, fingerprint)
            return
        try:
            old = json.loads(f.read_text())
        except ValueError:
            raise CheckpointMismatch(f"{f} is not valid JSON; restore it, or use a new --workdir") from None
        diffs = _diff(old, fingerprint)
        if not diffs:
            if fresh_search:
                self._discard_search()
            return
        key, was, now = diffs[0]
        if key.startswith("mask_spec.") and _group_names(old) != _group_names(fingerprint):
            key, was, now = "model.groups", _group_names(old), _group_names(fingerprint)
        search_only = all(k.split(".")[0] in SEARCH_KEYS for k, _, _ in diffs)
        if search_only and (fresh_search or not self.has_search_progress()):
            if fresh_search:
                self._discard_search()
            log(f"[run] new search settings ({key}: {was} -> {now}); the search starts from step 0")
            if jax.process_index() == 0:
                checkpoint.write_json_atomic(f, fingerprint)
            return
        what = f"workdir {self.path} holds a run with {key}={was}, this config has {key}={now}"
        if search_only:
            raise CheckpointMismatch(
                f"{what}; rerun with --fresh_search to start a new search here (the old one moves to "
                "discarded/, the dense model is kept), or use a new --workdir"
            )
        raise CheckpointMismatch(f"{what}; use a new --workdir, or delete this one")

    def _discard_search(self) -> None:
        if jax.process_index() != 0:
            return
        dest = self.path / "discarded" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        moved = []
        for name in _SEARCH_OUTPUTS:
            if (self.path / name).exists():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.move(str(self.path / name), str(dest / name))
                moved.append(name)
        for stage in _SEARCH_RESULTS:
            r = self.path / "results" / f"{stage}.json"
            if r.exists():
                (dest / "results").mkdir(parents=True, exist_ok=True)
                shutil.move(str(r), str(dest / "results" / r.name))
                moved.append(f"results/{r.name}")
        if moved:
            log(f"[run] --fresh_search: moved {', '.join(moved)} to {dest}")


def _holder(lock_file: Path) -> str:
    """The "(pid N on host H)" part of the message, from a lock file a run signed ("" if none did)."""
    try:
        info = json.loads(lock_file.read_text())
        return f" (pid {int(info['pid'])} on host {info['host']})"
    except (OSError, ValueError, TypeError, KeyError):
        return ""


def _is_step_dir(p: Path) -> bool:
    return p.is_dir() and p.name.isdigit()


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(x, list | tuple) and any(isinstance(v, dict) for v in x):
        out = {}
        for i, v in enumerate(x):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: x}


def _show(x: Any, n: int = 60) -> str:
    s = json.dumps(x, sort_keys=True) if not isinstance(x, str) else x
    return s if len(s) <= n else s[: n - 3] + "..."


def _diff(old: dict, new: dict) -> list[tuple[str, str, str]]:
    """(dotted key, old value, new value) for every leaf that differs (JSON-normalised)."""
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    keys = sorted(set(a) | set(b), key=_diff_rank)
    missing = "(missing)"
    return [(k, _show(a.get(k, missing)), _show(b.get(k, missing))) for k in keys if a.get(k) != b.get(k)]


def _diff_rank(key: str) -> tuple:
    """Settings a user changes first (model, data), derived ones next (mask_spec), the search last."""
    top = key.split(".")[0]
    return (top in SEARCH_KEYS, _DIFF_ORDER.index(top) if top in _DIFF_ORDER else len(_DIFF_ORDER), key)


def _group_names(fingerprint: dict) -> str:
    """The mask groups of a fingerprint's mask_spec, as model.groups would show them."""
    spec = fingerprint.get("mask_spec")
    groups = spec.get("groups") if isinstance(spec, dict) else None
    if not isinstance(groups, list):
        return "(missing)"
    return str(tuple(g.get("name") if isinstance(g, dict) else g for g in groups))


def target_dirname(target: str) -> str:
    """A directory name for a selection target (`params:0.5` -> `params_0.5`)."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", target.replace(":", "_"))
