"""What the launch scripts share: one-line errors instead of tracebacks, quiet logging, a run's config.

Every bad input ends in one line `error: <cause>; <what to do>` on stderr and a non-zero exit:
flag and config-override mistakes are diagnosed here (absl and ml_collections report them as multi-line
tracebacks), everything the library rejects arrives as an `SPPError`. SIGTERM and SIGINT end a run with the
resume state saved: exit 0 for SIGTERM (a preemption is not a failure), 130 for SIGINT.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging as std_logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _stopped_early(signum: int, frame) -> None:
    """SIGINT/SIGTERM before the run installs its own handlers (imports, checks): stop at once.

    Nothing is half-written at this point that a SIGKILL would not also leave (every save is atomic), so
    exiting without cleanup is safe, and it keeps a Ctrl-C during the imports from printing a traceback.
    """
    del frame
    print(
        f"[run] stopped by {signal.Signals(signum).name} before the run started; nothing is lost, "
        "rerun the same command to continue",
        file=sys.stderr,
        flush=True,
    )
    os._exit(0 if signum == signal.SIGTERM else 128 + signum)


for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, _stopped_early)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spp_jax.allocator import use_tcmalloc  # noqa: E402

use_tcmalloc()  # once, before anything is loaded: re-run this command under tcmalloc (spp_jax/allocator.py)

from absl import app, flags, logging  # noqa: E402

from spp_jax.errors import ConfigError, Preempted, SPPError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "compilation_cache", None,
    "Directory of JAX's persistent compilation cache, so a restarted run does not compile again; 'off' "
    "for none. Default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/spp_jax/xla/<machine> "
    "(spp_jax/compile_cache.py).",
)  # fmt: skip
_FLAG_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false"}
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", tuple: "a tuple"}


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's quoted key
        text = text[1:-1]
    return (text or type(e).__name__).splitlines()[0].rstrip(".")


def _is_flag(name: str) -> bool:
    """`name` is a defined flag (or `no<bool flag>`)."""
    return name in FLAGS or (name.startswith("no") and name[2:] in FLAGS)


def _config_leaves(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out.update(_config_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load_config(spec: str) -> tuple[str, Any]:
    """(config file, ConfigDict) of `file.py[:preset]`, or a one-line diagnosis as ConfigError."""
    path, _, preset = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist; give one such as configs/vit.py[:preset]")
    try:
        mod_spec = importlib.util.spec_from_file_location("_spp_config", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return path, module.get_config(preset or None)
    except SPPError:
        raise
    except Exception as e:  # the config file itself is broken
        raise ConfigError(
            f"config {spec} cannot be built ({_first_line(e)}); fix the file or the preset"
        ) from None


def _diagnose(argv: list[str], error: Exception) -> str:
    """Explain a flag-parsing failure in one line (config file, preset, override key or value)."""
    values, args = {}, argv[1:]
    for i, a in enumerate(args):
        m = re.match(r"--?([A-Za-z_][\w.]*)(?:=(.*))?$", a)
        if m:
            value = m.group(2)
            if value is None and i + 1 < len(args) and not re.match(r"-[A-Za-z_]", args[i + 1]):
                value = args[i + 1]  # `--flag value` (also `--flag -1`)
            values.setdefault(m.group(1), value)
    for name in values:
        if not name.startswith("config.") and not _is_flag(name):
            head, dot, rest = name.partition(".")  # `--conifg.seed`: compare the flag part alone
            close = difflib.get_close_matches(head, list(FLAGS), n=1, cutoff=0.6)
            hint = f" (did you mean --{close[0]}{dot}{rest}?)" if close else ""
            return f"unknown flag --{name}{hint}; run with --helpshort to see the flags"
    overrides = any(name.startswith("config.") for name in values)
    required = re.match(r"flag --([\w.]+)=None: Flag --\1 must have a value other than None", str(error))
    if "config" not in values and "config" in FLAGS and (overrides or (required and required[1] == "config")):
        return "--config is required; e.g. --config configs/vit.py (or configs/vit.py:quick)"
    if required:
        return f"--{required[1]} is required; run with --helpshort to see the flags"
    bad = re.match(r"flag --(\w+)=(.*?): (.*)", str(error))
    if bad and bad[1] in FLAGS and bad[1] != "config":
        want = _FLAG_KINDS.get(FLAGS[bad[1]].flag_type())
        if want and re.match(r"invalid literal|could not convert|\(?'Non-boolean", bad[3]):
            return f"--{bad[1]}={bad[2]} is not {want}; give {want}"
        reason = bad[3].rstrip(".")
        return f"--{bad[1]}={bad[2]} is not allowed ({reason}); run with --helpshort to see the flags"
    if values.get("config"):
        try:
            path, cfg = _load_config(values["config"])
        except ConfigError as e:
            return str(e)
        leaves = _config_leaves(cfg)
        sections = {k.split(".")[0] for k in leaves}
        for name in values:
            if not name.startswith("config."):
                continue
            key = name[len("config.") :]
            if key in leaves:
                continue
            close = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            if key in sections:
                hint = f" ({key} is a section; set one of its keys, e.g. --config.{key}.<key>=...)"
            return f"unknown config key {key}{hint}; {path} defines every key a run reads"
        msg = _first_line(error)
        for name in values:
            key = name[len("config.") :]
            if name.startswith("config.") and name in msg and key in leaves:
                want = _KINDS.get(type(leaves[key]), "a value of the config's type")
                return (
                    f"--{name}={values[name]} is not {want}; give {want} ({path} sets {key}={leaves[key]!r})"
                )
    return f"{_first_line(error)}; run with --helpshort to see the flags"


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run(..., flags_parser=parse_flags)`: flag mistakes end in one line, not a traceback."""
    try:
        return FLAGS(argv)
    except Exception as e:  # absl and ml_collections raise many types here
        fail(_diagnose(argv, e), code=2)
        raise  # unreachable: fail() exits


def _no_save_echoes(record: Any) -> bool:
    """A logging filter: drop orbax's error logs with a traceback (a failed background save logs two) and
    asyncio's "Task exception was never retrieved" for the other writes of a failed save. The error
    itself reaches spp_jax, which reports it in one line (`SaveFailed`) or raises it."""
    if not record.exc_info:
        return True
    if "orbax" in Path(record.pathname).parts:
        return False
    from spp_jax.errors import write_failure

    return record.name != "asyncio" or write_failure(record.exc_info[1]) is None


def _quiet_closed_loop_errors() -> None:
    """After a failed write, the other writes of that orbax save complete on orbax's event loop, which is
    closed by then, and each prints `RuntimeError: Event loop is closed` as an unraisable error. Those are
    echoes of the failure spp_jax reports in one line; drop them."""
    default = sys.unraisablehook

    def unraisablehook(info: Any) -> None:
        value = info.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            default(info)

    sys.unraisablehook = unraisablehook


def run_main(main: Callable[[list[str]], None]) -> None:
    """Run a launch script's `main` with quiet logging and the exit rules of the module docstring."""

    def wrapped(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        for logger in (logging.get_absl_logger(), std_logging.getLogger("asyncio")):
            logger.addFilter(_no_save_echoes)
        _quiet_closed_loop_errors()
        from spp_jax import compile_cache

        compile_cache.enable(FLAGS.compilation_cache)  # before the first compile
        try:
            main(argv)
        except Preempted as e:
            name = signal.Signals(e.signum).name
            if e.saved_step is not None:
                name += f" at search step {e.saved_step} (resume state saved)"
            print(
                f"[run] stopped by {name}; everything finished is saved, rerun the same command to continue",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(0 if e.signum == signal.SIGTERM else 128 + e.signum)
        except SPPError as e:
            fail(str(e))

    app.run(wrapped, flags_parser=parse_flags)


_DISTRIBUTED_ARGS = ("coordinator_address", "num_processes", "process_id")


def define_distributed_flags() -> None:
    """--distributed and the three flags that place this process in a multi-process run."""
    flags.DEFINE_bool(
        "distributed", False,
        "Run as one of several processes (jax.distributed): on a TPU pod, in a SLURM job or under Open MPI "
        "JAX reads the rest from the cluster; elsewhere give the three flags below (they imply it).",
    )  # fmt: skip
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, reachable from every process.")
    flags.DEFINE_integer("num_processes", None, "Number of processes of the run (all hosts together).")
    flags.DEFINE_integer("process_id", None, "This process's id, 0 .. num_processes - 1.")


def start_distributed() -> None:
    """Start jax.distributed when the flags ask for it; call before anything touches the devices."""
    given = [n for n in _DISTRIBUTED_ARGS if FLAGS[n].value is not None]
    if not FLAGS.distributed:
        if not given:
            return
        if FLAGS["distributed"].present:
            raise ConfigError(
                f"--nodistributed contradicts --{given[0]}; drop --nodistributed to run as one of several "
                "processes, or drop the process flags"
            )
    from spp_jax import distributed

    distributed.initialize(*(FLAGS[n].value for n in _DISTRIBUTED_ARGS))


def load_run_config(workdir: str):
    """The config a workdir was made with (config.json), validated; an SPPError names what is wrong."""
    import ml_collections

    from spp_jax.run_config import add_missing_keys, for_this_backend, validate_config

    d = Path(workdir)
    f = d / "config.json"
    if not d.is_dir():
        raise ConfigError(
            f"workdir {d} does not exist; point --workdir at a directory made by launch/train.py"
        )
    if not f.exists():
        raise ConfigError(f"{f} not found; point --workdir at a directory made by launch/train.py")
    try:
        saved = json.loads(f.read_text())
        cfg = ml_collections.ConfigDict(saved)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{f} is not a valid config ({_first_line(e)}); rerun launch/train.py with this --workdir "
            "to rewrite it"
        ) from None
    arch = cfg.get("model", {}).get("arch", "vit")  # workdirs made before model.arch existed are ViT runs
    defaults = Path(__file__).resolve().parents[1] / "configs" / f"{arch}.py"
    if not defaults.exists():
        raise ConfigError(
            f"{f} names model.arch={arch!r}, which has no configs/{arch}.py; is it a spp_jax run?"
        )
    add_missing_keys(cfg, _load_config(str(defaults))[1])
    validate_config(for_this_backend(cfg))
    return cfg
