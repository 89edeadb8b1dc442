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
on one step for all hosts, and no Python handler replaces the SIGTERM handler JAX's coordination service
installs (a SIGTERM to any one process stops them all after the same step). SIGINT (Ctrl-C in one
process's terminal) is turned into that SIGTERM, so it too stops every process with a resume state; a
second SIGINT stops this process at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

import jax

from spp_jax.errors import Preempted
from spp_jax.progress import log

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_pending: int | None = None  # signal recorded inside deferred()
_deferring = False
_forwarded = False  # several processes: a SIGINT was handed to JAX's preemption sync


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


def _sigint_to_preemption(signum: int, frame) -> None:
    """Several processes: a first SIGINT becomes JAX's preemption notice (SIGTERM), a second one stops."""
    global _forwarded
    del frame
    if _forwarded:
        raise stopped(signum)
    _forwarded = True
    print(  # this process's terminal, whichever process it is
        "[run] SIGINT: stopping every process after the same step, with a resume state (again: at once)",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Install the handlers for the duration of a run (main thread only; else no-op). With several
    processes only SIGINT's, which hands the stop to JAX's preemption sync (module docstring)."""
    global _pending, _forwarded
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _forwarded = False
    several = jax.process_count() > 1
    handlers = {signal.SIGINT: _sigint_to_preemption} if several else dict.fromkeys(_SIGNALS, _handler)
    old = {s: signal.signal(s, h) for s, h in handlers.items()}
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
