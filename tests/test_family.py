"""The family recovery end to end on the tiny ViT: one nested fine-tune -> WORKDIR/family -> any size on
demand; a killed nested fine-tune resumes bit for bit; FSDP trains the same family."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs.vit import get_config
from spp_jax import checkpoint, family, run
from spp_jax.errors import ConfigError
from spp_jax.stages.context import make_context
from spp_jax.stages.dense import stage_dense
from spp_jax.stages.family import save_members, stage_family
from spp_jax.stages.search import stage_search
from spp_jax.workdir import Workdir
from tests.helpers import write_synthetic_fashion_mnist

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier


def _config(base):
    c = get_config("mu")
    c.data.data_dir = str(base / "tfds")
    c.recovery = "family"
    c.family.targets = ("params:0.9", "params:0.8", "params:0.6", "params:0.5")
    c.family.members_per_step, c.family.steps, c.family.resume_every = 3, 6, 2
    c.family.eval_targets = ("params:0.9", "params:0.65", "params:0.5")
    c.finetune.distill = True
    return c


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    idx = tmp_path_factory.mktemp("idx")
    write_synthetic_fashion_mnist(idx)
    mp = pytest.MonkeyPatch()
    mp.setenv("SPP_FASHION_MNIST_DIR", str(idx))
    c = _config(tmp_path_factory.getbasetemp())
    wd = tmp_path_factory.mktemp("run")
    report = run.run_all(c, wd)
    yield c, wd, report
    mp.undo()


def test_family_run_reports_every_size_from_one_checkpoint(family_run):
    c, wd, report = family_run
    assert [t["target"] for t in report["targets"]] == list(c.family.eval_targets)
    fracs = [t["params_frac"] for t in report["targets"]]
    assert fracs == sorted(fracs, reverse=True)
    assert all(0 <= t["accuracy_finetuned"] <= 1 and t["throughput"] > 0 for t in report["targets"])
    assert set(report["stages"]) >= {"dense", "search", "family", "evaluate"}
    assert not (wd / "finetuned").exists()  # no per-size fine-tune, no per-size directory
    assert "family" in (wd / "report.md").read_text()


def test_any_size_loads_from_the_family_and_runs_alone(family_run, tmp_path):
    c, wd, _ = family_run
    fam = family.load_family(wd / "family")
    module, params, arch = family.load_pruned(wd / "family", target="params:0.63")  # never drawn by name
    ref, ref_arch = fam.cut("params:0.63", 1)
    assert arch == ref_arch
    jax.tree.map(np.testing.assert_array_equal, params, ref)
    images = np.random.default_rng(0).normal(size=(2, c.model.image_size, c.model.image_size, 3))
    assert module.apply({"params": params}, images.astype(np.float32)).shape == (2, 10)
    # a smaller target keeps a prefix of each layer's axes of a larger one (the family is nested)
    small, large = fam.keep("params:0.5"), fam.keep("params:0.8")
    assert all((small[g] <= large[g]).all() for g in small)
    with pytest.raises(ConfigError, match="weight family: give a target"):
        family.load_pruned(wd / "family")
    with pytest.raises(ConfigError, match="not a weight family"):
        family.load_pruned(wd / "dense", target="params:0.5")


def test_members_saved_from_the_family_load_as_plain_models(family_run):
    c, wd, _ = family_run
    ctx = make_context(c)
    save_members(ctx, Workdir(wd), ["flops:0.7"])
    _, params, arch = checkpoint.load_pruned(wd / "family_members" / "flops_0.7")
    ref, ref_arch = family.load_family(wd / "family").cut("flops:0.7", 1)
    assert arch == ref_arch
    jax.tree.map(np.testing.assert_array_equal, params, ref)


def _family_stage(c, wd, stop_after=None):
    """dense + search + the family stage, the nested fine-tune's loader killed after `stop_after` batches."""
    w = Workdir(wd).create()
    ctx = make_context(c)
    w.check_fingerprint(run.fingerprint(ctx))
    dense = stage_dense(ctx, w)["params_tree"]
    stage_search(ctx, w, dense)
    real = ctx.task.train_loader

    def loader(*a, **k):
        it = real(*a, **k)

        class Killed:
            n = 0

            def __next__(self):
                Killed.n += 1
                if stop_after is not None and Killed.n > stop_after:
                    raise KeyboardInterrupt("killed")
                return next(it)

            def get_state(self):
                return it.get_state()

            def set_state(self, s):
                it.set_state(s)

        return Killed()

    ctx.task.train_loader = loader
    return stage_family(ctx, w, dense)


def test_killed_nested_finetune_resumes_bit_for_bit(family_run, tmp_path):
    c, wd, _ = family_run
    with pytest.raises(KeyboardInterrupt):
        _family_stage(c, tmp_path, stop_after=5)  # resume states at steps 2 and 4
    assert checkpoint.ResumeStore(tmp_path / "nested" / "resume").latest_step() == 4
    _family_stage(c, tmp_path)
    a = family.load_family(wd / "family").params
    b = family.load_family(tmp_path / "family").params
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_fsdp_trains_the_same_family(family_run, tmp_path):
    c, wd, _ = family_run
    c = _config(tmp_path)
    c.mesh.fsdp = 4
    _family_stage(c, tmp_path)
    a = family.load_family(wd / "family").params
    b = family.load_family(tmp_path / "family").params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-5), a, b)
