"""Errors with a one-line cause and fix, raised on bad input (configs, assets, targets, checkpoints)."""


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
