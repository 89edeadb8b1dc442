"""Errors with a one-line cause and fix, raised on bad input (configs, assets, targets, checkpoints), a
workdir another run holds, and a failed write (`saving`: a full disk while saving a checkpoint)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator


class SPPError(Exception):
    """Base class: the message is one line naming the cause and what to do."""


class AssetNotInstalled(SPPError):
    """A model or dataset asset is missing: the message says which command installs it."""


class ConfigError(SPPError, ValueError):
    """A config value is unknown or out of range (also a ValueError, as for any bad argument)."""


class UnreachableTarget(SPPError):
    """A selection target the path cannot satisfy."""


class CheckpointMismatch(SPPError):
    """A workdir or checkpoint belongs to another model, or is corrupt."""


class NonFiniteLoss(SPPError):
    """The loss became NaN/Inf: the run stops before writing a bad path point."""


class Preempted(SPPError):
    """The run was stopped by SIGTERM or SIGINT; everything saved so far is intact and a rerun resumes.

    `signum` is the signal; `saved_step` the search step of the resume state written on the way out
    (None when the stop came outside the search loop).
    """

    def __init__(self, message: str, signum: int, saved_step: int | None = None):
        super().__init__(message)
        self.signum, self.saved_step = signum, saved_step


class WorkdirInUse(SPPError):
    """Another live run holds the workdir's lock (spp_jax.workdir.Workdir.lock)."""


class SaveFailed(SPPError):
    """A write failed (disk full, no permission, I/O error): what was saved before is intact, a rerun
    resumes from it."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# tensorstore, which writes orbax's arrays, reports a failed write as a ValueError whose text ends in
# "... No space left on device [os_error_code='28']"; a few more texts mean a failed write too
_TS_ERRNO = re.compile(r"os_error_code='?(\d+)")
_FULL_TEXT = re.compile("No space left on device|Disk quota exceeded")
_TS_WRITE = re.compile(r"^(RESOURCE_EXHAUSTED|PERMISSION_DENIED): ")


def write_failure(e: BaseException) -> tuple[bool, str] | None:
    """(disk full?, short cause) when `e` (or its `__cause__`) is a failed write, else None."""
    for _ in range(8):  # a short chain of `raise ... from`
        if e is None:
            return None
        if isinstance(e, OSError):
            code = e.errno
            cause = os.strerror(code) if code else (str(e) or type(e).__name__)
            return code in _DISK_FULL, cause
        text = str(e)
        if isinstance(e, ValueError | RuntimeError) and (
            _TS_ERRNO.search(text) or _TS_WRITE.search(text) or _FULL_TEXT.search(text)
        ):
            m = _TS_ERRNO.search(text)
            code = int(m[1]) if m else None
            full = code in _DISK_FULL or bool(_FULL_TEXT.search(text))
            cause = os.strerror(code) if code else text.splitlines()[0][:160]
            return full, cause
        e = e.__cause__
    return None


def save_failed(what: str, e: BaseException) -> SaveFailed | None:
    """The one-line `SaveFailed` for a failed write `e` while saving `what`; None if `e` is not one."""
    failure = write_failure(e)
    if failure is None:
        return None
    full, cause = failure
    resume = "rerun the same command to resume (everything saved before is intact)"
    if full:
        return SaveFailed(f"disk full while saving {what} ({cause}); free space on that disk, then {resume}")
    return SaveFailed(f"cannot save {what} ({cause}); fix that (permissions, disk), then {resume}")


@contextlib.contextmanager
def saving(what: str) -> Iterator[None]:
    """Turn a failed write inside the block into `SaveFailed` naming `what` (e.g. "path point 12 to
    WORKDIR/search/path"); other errors pass unchanged."""
    try:
        yield
    except SPPError:
        raise
    except Exception as e:
        err = save_failed(what, e)
        if err is None:
            raise
        raise err from e
