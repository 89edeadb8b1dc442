"""The Swin row end to end (configs/swin.py:mu on synthetic Fashion-MNIST-format data): a dense model trained
from scratch by the dense stage, search, stage-addressed targets, extraction, fine-tune, report, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs.swin import get_config
from spp_jax import checkpoint, run
from tests.helpers import write_synthetic_fashion_mnist

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory):
    idx = tmp_path_factory.mktemp("idx")
    write_synthetic_fashion_mnist(idx)
    mp = pytest.MonkeyPatch()
    mp.setenv("SPP_FASHION_MNIST_DIR", str(idx))
    cfg = get_config("mu")
    cfg.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds_swin")
    wd = tmp_path_factory.mktemp("swin")
    report = run.run_all(cfg, wd)
    yield cfg, wd, report
    mp.undo()


def test_the_run_writes_a_report_with_every_target(swin_run):
    cfg, wd, report = swin_run
    assert (wd / "report.md").exists()
    assert [t["target"] for t in report["targets"]] == list(cfg.extract.targets)
    for t in report["targets"]:
        assert 0.0 <= t["accuracy_masked"] <= 1.0 and 0.0 <= t["accuracy_finetuned"] <= 1.0
        assert t["params"] < report["dense"]["params"]
    assert set(report["path"][-1]["support"]) == {
        f"stage{s}/{k}" for s in (0, 1) for k in cfg.model.groups
    } | {"all"}


def test_a_stage_target_prunes_only_that_stage(swin_run):
    _, wd, _ = swin_run
    meta = json.loads((wd / "extracted" / "groups_stage1=0.3" / "meta.json").read_text())
    groups = meta["summary"]["groups"]
    stage0 = [g for g in groups if g.startswith("stage0/")]
    stage1 = [g for g in groups if g.startswith("stage1/")]
    assert stage0 and stage1
    assert all(groups[g]["fraction"] == 1.0 for g in stage0)
    assert all(groups[g]["fraction"] < 0.5 for g in stage1)


def test_extracted_and_finetuned_models_run_alone(swin_run):
    cfg, wd, _ = swin_run
    size = cfg.model.image_size
    images = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)
    for sub in ("extracted", "finetuned"):
        for d in sorted((wd / sub).iterdir()):
            module, params, spec = checkpoint.load_pruned(d)
            assert spec["arch"] == "swin"
            logits = np.asarray(module.apply({"params": params}, images))
            assert logits.shape == (3, 10) and np.isfinite(logits).all()


def test_dense_stage_trained_the_random_init(swin_run):
    cfg, wd, _ = swin_run
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "dense" for r in rows)
    _, params, _ = checkpoint.load_pruned(wd / "dense")
    assert np.abs(np.asarray(params["head"]["kernel"])).max() > 0  # the head starts at zero


def test_a_second_run_resumes_without_recomputing(swin_run):
    cfg, wd, report = swin_run
    again = run.run_all(cfg, wd)
    key = lambda r: [(t["target"], t["accuracy_masked"], t["accuracy_finetuned"]) for t in r["targets"]]
    assert key(again) == key(report)
