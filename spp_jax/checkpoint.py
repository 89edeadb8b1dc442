"""Every orbax call of spp_jax lives here (orbax's API moves; one small module absorbs that).

- `PathStore`: the solution path. One orbax step per path point holding the mask state (Gamma, Z, M, t_in,
  steps in support) and a JSON record of its metrics (docs/algorithm.md §4). Never pruned.
- `ResumeStore`: the full search state plus the data iterator position, kept separately (last 2 only).
- `save_model` / `load_pruned`: a Flax param tree plus its JSON architecture spec; the spec alone rebuilds
  the module.

Crash safety: orbax writes each step to a temporary directory and renames it when complete, so a crash or
kill leaves either the previous points or the new one, never a half-written point; leftover temporary
directories are removed when a store opens. Every array save carries a SHA-256 of its arrays in its JSON
record (`checksum`), checked on every read, so garbage that still parses is reported, not used.

A failed write (a full disk, no permission) raises `SaveFailed`, one line naming what was being saved and
where (spp_jax.errors.saving): the step being written stays a temporary directory, the points and models
saved before stay readable, and a rerun resumes from them. A failure of orbax's background write surfaces
at the store's next save, `wait` or `close`, named after the step it belongs to.

Several processes (jax.distributed) make every save, delete and restore call together, as orbax requires:
orbax writes each array and JSON item once (replicated ones from process 0) and commits a step after a
barrier; the JSON files of `save_model` and the cleanup of temporary directories are process 0's, and the
others wait for it, so every process sees the same finished checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from spp_jax import distributed
from spp_jax.adapters import adapter_from_spec
from spp_jax.errors import CheckpointMismatch, SPPError, saving
from spp_jax.progress import log


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temp file + rename so readers never see a partial file (`SaveFailed` when the
    write fails; the old file, if any, is then unchanged)."""
    with saving(str(path)):
        _write_json_atomic(Path(path), obj)


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic | np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def tree_checksum(tree: Any) -> str:
    """SHA-256 over every leaf's key path, dtype, shape and bytes (host copies; any array pytree)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


_TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step that is still being written


def _remove_unfinished(directory: Path) -> None:
    """Delete temporary step directories a killed save left behind (process 0 deletes, all wait for it)."""
    if jax.process_index() == 0 and directory.is_dir():
        for p in directory.iterdir():
            if _TMP_MARK in p.name and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    distributed.barrier("spp_jax:store_opened")


def _manager(
    directory: Path, max_to_keep: int | None, read_only: bool = False, name: str = "store"
) -> ocp.CheckpointManager:
    if not read_only:
        _remove_unfinished(directory)
    # Readers never create, clean or delete (orbax's own read_only mode logs a warning per store).
    # `name` keeps the cross-process barriers of stores that save at the same time apart (orbax's keys
    # are per manager only with a prefix: two unprefixed managers saving together fail a barrier).
    multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"spp_jax_{name}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, multiprocessing_options=multiprocessing
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


class _Store:
    """An orbax manager over `directory`; read-only stores never create it (an absent one is empty).

    Saves are asynchronous: `_pending` is the last step handed to orbax, which a background write
    failure belongs to (it surfaces at the next save, `wait` or `close`)."""

    what = "checkpoint"  # what one step is, for error messages

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None, read_only: bool):
        self.directory = Path(directory)
        self._pending: int | None = None
        absent = read_only and not self.directory.is_dir()
        name = type(self).__name__
        with saving(f"{self.what}s to {self.directory}"):
            self._mngr = None if absent else _manager(self.directory, max_to_keep, read_only, name)

    def _saving(self, step: int | None) -> contextlib.AbstractContextManager[None]:
        return saving(f"{self.what} {step} to {self.directory}" if step is not None else str(self.directory))

    def _save(self, step: int, args: ocp.args.Composite) -> None:
        with self._saving(self._pending):  # the previous save's background write, if it failed
            self._mngr.wait_until_finished()
        self._pending = step
        with self._saving(step):
            self._mngr.save(step, args=args, force=True)

    def steps(self) -> list[int]:
        if self._mngr is None:
            return []
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def delete_after(self, step: int) -> list[int]:
        """Delete every stored step > `step` (work a killed run did past its last resume state)."""
        gone = [s for s in self.steps() if s > step]
        for s in gone:
            self._mngr.delete(s)
        return gone

    def wait(self) -> None:
        if self._mngr is not None:
            with self._saving(self._pending):
                self._mngr.wait_until_finished()

    def close(self) -> None:
        if self._mngr is not None:
            with self._saving(self._pending):
                self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unreadable(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__


def _targets(directory: Path, sharding: Any = None) -> Any:
    """Abstract restore targets for the array tree saved in `directory`: shapes and dtypes from its
    metadata, placed by `sharding` (a Sharding, or `shape -> Sharding`; None = one local device).

    Orbax restores a target-less jax array onto the devices that saved it and refuses another topology;
    with these targets a tree saved on 8 devices restores on 1, or on a mesh sharded another way."""
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    place = sharding if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding) else None
    tree = ocp.StandardCheckpointHandler().metadata(directory).tree
    is_leaf = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=place(m.shape) if place else sharding),
        tree,
        is_leaf=is_leaf,
    )


class PathStore(_Store):
    """Path points: `save(step, arrays, record)`, `steps()`, `record(step)`, `arrays(step)`."""

    what = "path point"

    def __init__(self, directory: str | os.PathLike, read_only: bool = False):
        super().__init__(directory, None, read_only)

    def save(self, step: int, arrays: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        arrays = jax.tree.map(np.asarray, dict(arrays))
        record = {**record, "step": int(step), "checksum": tree_checksum(arrays)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(arrays), record=ocp.args.JsonSave(record))
        self._save(int(step), args)

    def _corrupt(self, step: int, what: str) -> CheckpointMismatch:
        return CheckpointMismatch(
            f"path point {step} in {self.directory} is corrupt ({what}); delete {self.directory / str(step)} "
            "and pick another point, or rerun the search with --fresh_search"
        )

    def record(self, step: int) -> dict[str, Any]:
        """The point's JSON record, checked to be this point's (`step` field)."""
        self._check_step(step)
        try:
            rec = self._mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        except Exception as e:  # orbax raises many types for missing/corrupt files
            raise self._corrupt(step, f"record unreadable: {_unreadable(e)}") from None
        if not isinstance(rec, Mapping) or rec.get("step") != step:
            raise self._corrupt(step, "its record does not describe this step")
        return dict(rec)

    def arrays(self, step: int) -> dict[str, Any]:
        """Gamma, Z, M, t_in, steps in support at `step` (host arrays), verified against the record's
        checksum. Restored with explicit targets: a point saved on any topology reads back on this one."""
        rec = self.record(step)
        try:
            targets = _targets(self.directory.absolute() / str(step) / "state")
            out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(targets)))
        except Exception as e:  # orbax raises many types for missing/corrupt files
            raise self._corrupt(step, f"arrays unreadable: {_unreadable(e)}") from None
        arrays = jax.tree.map(np.asarray, dict(out["state"]))
        if "checksum" in rec and rec["checksum"] != tree_checksum(arrays):
            raise self._corrupt(step, "array data does not match its checksum")
        return arrays

    def records(self) -> list[dict[str, Any]]:
        return [self.record(s) for s in self.steps()]

    def _check_step(self, step: int) -> None:
        have = self.steps()
        if step not in have:
            span = f"{have[0]}..{have[-1]} ({len(have)} points)" if have else "none"
            raise CheckpointMismatch(
                f"no path point at step {step} in {self.directory} (stored: {span}); "
                "pick a stored step, or a params/flops/groups target"
            )


class ResumeStore(_Store):
    """Latest search states (state pytree + JSON extras such as the data iterator position)."""

    what = "resume state"

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2, read_only: bool = False):
        super().__init__(directory, max_to_keep, read_only)

    def save(self, step: int, state: Any, extras: Mapping[str, Any]) -> None:
        extras = {**extras, "step": int(step), "checksum": tree_checksum(jax.device_get(state))}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(extras))
        self._save(int(step), args)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, abstract_state: Any, step: int) -> tuple[Any, dict[str, Any]]:
        """Restore `step` onto `abstract_state` (arrays or ShapeDtypeStructs with shardings), verified."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extras=ocp.args.JsonRestore()
        )
        where = f"resume state at step {step} in {self.directory}"
        try:
            out = self._mngr.restore(step, args=args)
        except Exception as e:  # orbax raises many types for missing/corrupt/mismatched files
            raise CheckpointMismatch(
                f"{where} cannot be restored ({_unreadable(e)}); delete {self.directory / str(step)} "
                "to resume from an earlier state, or rerun with --fresh_search"
            ) from None
        extras = out["extras"]
        if not isinstance(extras, Mapping) or extras.get("step", step) != step:
            raise CheckpointMismatch(f"{where} has a corrupt record; delete {self.directory / str(step)}")
        if "checksum" in extras and extras["checksum"] != tree_checksum(jax.device_get(out["state"])):
            raise CheckpointMismatch(
                f"{where} does not match its checksum (corrupt data); delete {self.directory / str(step)} "
                "to resume from an earlier state"
            )
        return out["state"], dict(extras)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest state that reads back, skipping (and reporting) corrupt newer ones; None if none.

        Raises the newest state's error when no stored state can be restored.
        """
        first_error = None
        for step in reversed(self.steps()):
            try:
                state, extras = self.restore(abstract_state, step)
            except CheckpointMismatch as e:
                first_error = first_error or e
                continue
            if first_error is not None:
                log(f"[search] skipped an unreadable resume state: {first_error}")
            return step, state, extras
        if first_error is not None:
            raise first_error
        return None


def save_model(
    directory: str | os.PathLike,
    params: Any,
    arch_spec: Mapping[str, Any],
    arrays: Mapping[str, Any] | None = None,
    **meta: Any,
) -> None:
    """Store a model as `params/` (orbax) + `arch_spec.json` (+ `meta.json`); the spec rebuilds it.
    `arrays`, a pytree of host arrays that belongs to the model (a weight family's ranking), lands in
    `arrays/` with its own checksum (`load_arrays`). A failed write raises `SaveFailed` and leaves the
    model incomplete (no arch_spec.json), so a rerun saves it again."""
    with saving(f"the model to {directory}"):
        _save_model(Path(directory).absolute(), params, arch_spec, arrays, meta)


def _save_model(
    directory: Path, params: Any, arch_spec: Mapping[str, Any], arrays: Mapping[str, Any] | None, meta: dict
) -> None:
    primary = jax.process_index() == 0  # with several processes: every one saves (orbax), one writes JSON
    if primary:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "arch_spec.json").unlink(missing_ok=True)  # incomplete until rewritten below
    distributed.barrier("spp_jax:save_model")
    params = jax.tree.map(np.asarray, params)
    sums = {"checksum": tree_checksum(params)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
        if arrays is not None:
            arrays = jax.tree.map(np.asarray, arrays)
            ckptr.wait_until_finished()
            ckptr.save(directory / "arrays", arrays, force=True)
            sums["arrays_checksum"] = tree_checksum(arrays)
    if primary:
        _write_json_atomic(directory / "meta.json", {**meta, **sums})
        _write_json_atomic(directory / "arch_spec.json", dict(arch_spec))  # written last: marks completion
    distributed.barrier("spp_jax:model_saved")  # every process sees the finished model


def is_complete_model(directory: str | os.PathLike, **expected: Any) -> bool:
    """True if `directory` holds a finished `save_model` whose meta.json has every `expected` value."""
    d = Path(directory)
    if not (d / "arch_spec.json").exists():
        return False
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in expected.items())


def load_pruned(directory: str | os.PathLike, sharding: Any = None):
    """Load a saved (pruned or dense) model: returns (flax module, params, arch_spec).

    `sharding` None gives host (numpy) params; a `jax.sharding.Sharding`, or a `shape -> Sharding` such as
    `spp_jax.sharding.leaf_sharding(mesh)`, restores each array straight onto those devices (jax arrays),
    whatever topology saved the model.

    Example:
        module, params, spec = spp_jax.load_pruned("workdir/extracted/params_0.5")
        logits = module.apply({"params": params}, images)
    """
    directory = Path(directory).absolute()
    spec_file = directory / "arch_spec.json"
    if not spec_file.exists():
        raise CheckpointMismatch(
            f"{directory} has no arch_spec.json (not a saved spp_jax model, or its save did not finish); "
            "point at a directory written by launch/extract.py or launch/finetune.py"
        )
    redo = "re-run the extraction (launch/extract.py) or the fine-tune that wrote it"
    try:
        arch_spec = json.loads(spec_file.read_text())
        meta_file = directory / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        adapter = adapter_from_spec(arch_spec)
        module = adapter.module(arch_spec)
        expected = adapter.arch_cost(arch_spec)[0]
    except SPPError:
        raise
    except Exception as e:  # garbage JSON or a spec with missing/mistyped fields
        raise CheckpointMismatch(
            f"{directory}: arch_spec.json or meta.json is corrupt ({_unreadable(e)}); {redo}"
        ) from None
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(directory / "params", _targets(directory / "params", sharding))
    except Exception as e:  # orbax raises many types for missing/corrupt files
        raise CheckpointMismatch(
            f"{directory / 'params'} cannot be read ({_unreadable(e)}), the save is corrupt or incomplete; "
            f"{redo}"
        ) from None
    if sharding is None:
        params = jax.tree.map(np.asarray, params)
    got = sum(int(np.size(v)) for v in jax.tree.leaves(params))
    if got != expected:
        raise CheckpointMismatch(
            f"{directory}: params hold {got} values but arch_spec.json describes {expected} (corrupt or "
            f"mixed directory); {redo}"
        )
    if isinstance(meta, Mapping) and "checksum" in meta and meta["checksum"] != tree_checksum(params):
        raise CheckpointMismatch(f"{directory}: params do not match their checksum (corrupt data); {redo}")
    return module, params, arch_spec


def load_arrays(directory: str | os.PathLike) -> dict[str, Any]:
    """The `arrays` a `save_model` stored beside a model's params (host arrays), checked against their
    checksum."""
    directory = Path(directory).absolute()
    redo = "rebuild it (launch/train.py reruns the stage that wrote it)"
    try:
        meta = json.loads((directory / "meta.json").read_text())
        with ocp.StandardCheckpointer() as ckptr:
            arrays = ckptr.restore(directory / "arrays")
    except Exception as e:  # orbax raises many types for missing/corrupt files
        raise CheckpointMismatch(
            f"{directory / 'arrays'} cannot be read ({_unreadable(e)}); {redo}"
        ) from None
    arrays = jax.tree.map(np.asarray, arrays)
    if meta.get("arrays_checksum") != tree_checksum(arrays):
        raise CheckpointMismatch(f"{directory / 'arrays'} does not match its checksum (corrupt data); {redo}")
    return arrays
