"""Stop cleanly on SIGTERM (preemption) and SIGINT (Ctrl-C).

Cloud and TPU VMs send SIGTERM some seconds before they take a machine away. While `stop_signals()` is
active, a signal is handled in one of two ways:

- inside `deferred()` (the search loop), it is only recorded: the loop finishes the current step,
  writes a resume state and raises `Preempted` (`stop_requested(step)` tells it when);
- anywhere else it raises `Preempted` at once. Every save in spp_jax is atomic (orbax commits a step by
  renaming its temporary directory, JSON files are written to a temp file and renamed), so stopping
  between two Python statements loses only the work since the last save.

A second signal while a deferred stop is pending raises at once (a user pressing Ctrl-C twice).

With several processes (`jax.distributed`), the signal reaches the hosts at different times, so the
decision must be collective: `stop_requested(step)` then asks JAX's preemption sync point, which agrees
on one step for all hosts, and no Python handler replaces the one JAX's coordination service installs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax

from spp_jax.errors import Preempted
from spp_jax.progress import log

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_pending: int | None = None  # signal recorded inside deferred()
_deferring = False


def stopped(signum: int, step: int | None = None) -> Preempted:
    """The `Preempted` error for a stop by `signum`, after saving a resume state at `step` if given."""
    name = signal.Signals(signum).name
    where = "" if step is None else f" at search step {step}, resume state saved"
    return Preempted(f"stopped by {name}{where}", signum, step)


def _handler(signum: int, frame) -> None:
    global _pending
    del frame
    if _deferring and _pending is None:
        _pending = signum
        log(f"[run] {signal.Signals(signum).name}: finishing this step and saving a resume state")
        return
    raise stopped(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Install the handlers for the duration of a run (main thread, single process only; else no-op)."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield
        return
    old = {s: signal.signal(s, _handler) for s in _SIGNALS}
    _pending = None
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Record signals instead of raising, until the caller reaches a safe point (`stop_requested`)."""
    global _deferring, _pending
    _deferring, _pending = True, None
    try:
        yield
    finally:
        _deferring = False
    if _pending is not None:  # arrived after the caller's last check
        raise stopped(_pending)


def stop_requested(step: int) -> int | None:
    """The signal to stop for after `step`, or None to go on (collective with several processes)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
    return _pending
