"""Every orbax call of spp_jax lives here (orbax's API moves; one small module absorbs that).

- `PathStore`: the solution path. One orbax step per path point holding the mask state (Gamma, Z, M, t_in,
  steps in support) and a JSON record of its metrics (algorithm.md §4). Never pruned.
- `ResumeStore`: the full search state plus the data iterator position, kept separately (last 2 only).
- `save_model` / `load_pruned`: a Flax param tree plus its JSON architecture spec; the spec alone rebuilds
  the module.
orbax writes each step to a temporary directory and renames it when complete, so a crash or kill leaves
either the previous points or the new one, never a half-written point.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from spp_jax.adapters import adapter_from_spec
from spp_jax.errors import CheckpointMismatch


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temp file + rename so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic | np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _manager(directory: Path, max_to_keep: int | None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


class PathStore:
    """Path points: `save(step, arrays, record)`, `steps()`, `record(step)`, `arrays(step)`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._mngr = _manager(self.directory, None)

    def save(self, step: int, arrays: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        arrays = jax.tree.map(np.asarray, dict(arrays))
        args = ocp.args.Composite(state=ocp.args.StandardSave(arrays), record=ocp.args.JsonSave(dict(record)))
        self._mngr.save(int(step), args=args, force=True)

    def steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def record(self, step: int) -> dict[str, Any]:
        self._check_step(step)
        return dict(
            self._mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        )

    def arrays(self, step: int) -> dict[str, Any]:
        self._check_step(step)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        except Exception as e:  # orbax raises many types for missing/corrupt files
            raise CheckpointMismatch(
                f"path point {step} in {self.directory} cannot be read ({type(e).__name__}): delete "
                f"{self.directory / str(step)} and pick another point (or rerun the search)"
            ) from e
        return jax.tree.map(np.asarray, dict(out["state"]))

    def records(self) -> list[dict[str, Any]]:
        return [self.record(s) for s in self.steps()]

    def _check_step(self, step: int) -> None:
        if step not in self.steps():
            have = self.steps()
            span = f"{have[0]}..{have[-1]} ({len(have)} points)" if have else "none"
            raise CheckpointMismatch(
                f"no path point at step {step} in {self.directory}; stored: {span}. "
                "Pick a stored step, or a params/flops/groups target"
            )

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()


class ResumeStore:
    """Latest search states (state pytree + JSON extras such as the data iterator position)."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = Path(directory)
        self._mngr = _manager(self.directory, max_to_keep)

    def save(self, step: int, state: Any, extras: Mapping[str, Any]) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(dict(extras)))
        self._mngr.save(int(step), args=args, force=True)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore onto `abstract_state` (a pytree of arrays or ShapeDtypeStructs with shardings)."""
        step = self._mngr.latest_step() if step is None else step
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extras=ocp.args.JsonRestore()
        )
        try:
            out = self._mngr.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointMismatch(
                f"resume state at step {step} in {self.directory} does not fit this run "
                f"({type(e).__name__}); use a new --workdir or delete {self.directory}"
            ) from e
        return out["state"], dict(out["extras"])

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()


def save_model(directory: str | os.PathLike, params: Any, arch_spec: Mapping[str, Any], **meta: Any) -> None:
    """Store a model as `params/` (orbax) + `arch_spec.json` (+ `meta.json`); the spec rebuilds it."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", jax.tree.map(np.asarray, params), force=True)
    write_json_atomic(directory / "meta.json", meta)
    write_json_atomic(directory / "arch_spec.json", dict(arch_spec))  # written last: marks completion


def load_pruned(directory: str | os.PathLike):
    """Load a saved (pruned or dense) model: returns (flax module, params, arch_spec).

    Example:
        module, params, spec = spp_jax.load_pruned("workdir/extracted/params_0.5")
        logits = module.apply({"params": params}, images)
    """
    directory = Path(directory).absolute()
    spec_file = directory / "arch_spec.json"
    if not spec_file.exists():
        raise CheckpointMismatch(
            f"{directory} has no arch_spec.json: not a saved spp_jax model (or its save did not finish); "
            "run launch/extract.py to create it"
        )
    arch_spec = json.loads(spec_file.read_text())
    adapter = adapter_from_spec(arch_spec)
    module = adapter.module(arch_spec)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(directory / "params")
    except Exception as e:  # orbax raises many types for missing/corrupt files
        raise CheckpointMismatch(
            f"{directory / 'params'} cannot be read ({type(e).__name__}): the save is corrupt or incomplete; "
            "re-run the extraction (launch/extract.py) for this target"
        ) from e
    params = jax.tree.map(np.asarray, params)
    expected = adapter.arch_cost(arch_spec)[0]
    got = sum(int(np.size(v)) for v in jax.tree.leaves(params))
    if got != expected:
        raise CheckpointMismatch(
            f"{directory}: params hold {got} values but arch_spec.json describes {expected}; "
            "the directory is corrupt or mixed, re-run the extraction"
        )
    return module, params, arch_spec
