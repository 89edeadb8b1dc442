"""Progress lines with rate and ETA, and JSONL metrics (process 0 only)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from spp_jax.errors import saving


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


class Progress:
    """`Progress("search", total).update(step, loss=...)` prints `[search] 120/400 3.1 it/s ETA 1m30s ...`."""

    def __init__(self, stage: str, total: int, every_s: float = 10.0, start: int = 0):
        self.stage, self.total, self.every_s, self.start = stage, total, every_s, start
        self.t0 = self.last = time.perf_counter()

    def update(self, step: int, force: bool = False, **metrics: float) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every_s and step != self.total:
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        extra = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        log(f"[{self.stage}] {step}/{self.total} {rate:.2f} it/s ETA {_fmt(eta)} {extra}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _fmt(s: float) -> str:
    if not np.isfinite(s):
        return "?"
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class MetricWriter:
    """Appends one JSON object per line to `workdir/metrics.jsonl` (process 0 only)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / "metrics.jsonl"

    def write(self, stage: str, step: int, **metrics: Any) -> None:
        if jax.process_index() != 0:
            return
        row = {"stage": stage, "step": int(step), "time": time.time()}
        row.update({k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in metrics.items()})
        line = (json.dumps(row) + "\n").encode()
        with saving(f"metrics to {self.path}"), open(self.path, "ab+") as f:
            end = f.seek(0, os.SEEK_END)
            if end and (f.seek(end - 1), f.read(1))[1] != b"\n":
                line = b"\n" + line  # a line a kill or a full disk cut short stays apart (readers skip it)
            f.write(line)

    def drop_after(self, stages: tuple[str, ...], step: int) -> None:
        """Drop rows of `stages` past `step` and lines a kill cut short (a resumed run replays them)."""
        if jax.process_index() != 0 or not self.path.exists():
            return
        kept, changed = [], False
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                drop = row.get("stage") in stages and row.get("step", 0) > step
            except (ValueError, AttributeError):
                drop = True
            changed |= drop
            if not drop:
                kept.append(line)
        if changed:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with saving(f"metrics to {self.path}"):
                tmp.write_text("".join(f"{line}\n" for line in kept))
                os.replace(tmp, self.path)
