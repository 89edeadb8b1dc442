"""spp_jax.report: files written, markdown content, JSON round trip, missing optional keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spp_jax.report import render_markdown, to_jsonable, write_report

FILES = ("report.json", "report.md", "path.png", "accuracy_vs_params.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_report() -> dict:
    steps = np.arange(0, 1001, 100)
    frac = np.linspace(0.0, 1.0, len(steps))
    path = [
        {
            "step": int(s),
            "support": {"qk": f**2, "vo": f**1.5, "mlp": np.float32(f), "all": float(f)},
            "kept_params_frac": 0.1 + 0.9 * f,
            "kept_macs_frac": np.float64(0.2 + 0.8 * f),
            **({"accuracy": 0.3 + 0.5 * f} if i % 2 == 0 else {}),
        }
        for i, (s, f) in enumerate(zip(steps, frac, strict=True))
    ]
    layers = [{"num_heads": 6, "qk_dim": 40, "v_dim": 50, "mlp_dim": 700}] * 2
    targets = [
        {
            "target": f"params:{p}",
            "params": np.int64(int(22e6 * p)),
            "macs": int(4.6e9 * p),
            "params_frac": p,
            "macs_frac": p,
            "layers": layers,
            "accuracy_masked": 0.2 * p,
            "accuracy_finetuned": 0.7 + 0.1 * p,
            "throughput": 100.0 / p,
            "dir": f"extracted/params_{p}",
        }
        for p in (0.3, 0.5, 0.7)
    ]
    return {
        "model": {"variant": "S/16", "init": "random", "image_size": 224, "params": 22_000_000},
        "data": {"dataset": "fashion_mnist", "train_split": "train", "eval_split": "test", "num_classes": 10},
        "config": {"search/mode": "official", "search/steps": 1000},
        "stages": {"dense": 12.5, "search": 3700.0, "extract": 1.2, "finetune": 90.0,
                   "evaluate": np.float32(4)},
        "dense": {"accuracy": np.float32(0.8123), "params": 22_000_000, "macs": 4_600_000_000,
                  "throughput": 100.0},
        "path": path,
        "targets": targets,
    }  # fmt: skip


def check_files(workdir) -> None:
    for name in FILES:
        assert (workdir / name).is_file(), name
    for name in ("path.png", "accuracy_vs_params.png"):
        blob = (workdir / name).read_bytes()
        assert blob.startswith(PNG_MAGIC), name
        assert len(blob) > 5000, (name, len(blob))


def test_write_report_full(tmp_path):
    report = synthetic_report()
    write_report(str(tmp_path), report)
    check_files(tmp_path)

    md = (tmp_path / "report.md").read_text()
    for t in report["targets"]:
        assert t["target"] in md
    assert "81.23%" in md  # dense accuracy
    assert "75.00%" in md and "2.00x" in md  # params:0.5: fine-tuned accuracy, speedup
    assert "Stage wall time" in md and "1:01:40" in md  # search 3700 s
    assert "Path points**: 11" in md and "First step**: 0" in md and "Last step**: 1000" in md
    assert "heads 6,6; qk 40,40; vo 50,50; mlp 700,700" in md

    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded == to_jsonable(report)
    assert loaded["dense"]["accuracy"] == pytest.approx(0.8123)
    assert isinstance(loaded["targets"][0]["params"], int)
    assert json.loads(json.dumps(loaded)) == loaded


def test_write_report_minimal_and_missing_keys(tmp_path):
    write_report(str(tmp_path / "a"), {"dense": {}, "path": []})
    check_files(tmp_path / "a")

    sparse = {
        "dense": {"accuracy": 0.5},
        "path": [{"step": 3}, {"step": 7, "support": {"qk": 0.5}}, {"support": {"all": 1.0}}],
        "targets": [{"target": "flops:0.4"}, {}, {"target": "params:0.5", "params": 10, "throughput": 2.0}],
        "stages": {"search": None, "custom": 2.0},
        "model": {},
    }
    write_report(str(tmp_path / "b"), sparse)
    check_files(tmp_path / "b")
    md = (tmp_path / "b" / "report.md").read_text()
    assert "flops:0.4" in md and "params:0.5" in md and "50.00%" in md


def test_to_jsonable():
    out = to_jsonable({1: np.arange(3), "x": (np.float32(0.5), float("nan"), np.inf), "b": np.bool_(True)})
    assert out == {"1": [0, 1, 2], "x": [0.5, None, None], "b": True}
    json.dumps(out, allow_nan=False)


def test_render_markdown_has_no_nan():
    md = render_markdown({"dense": {"accuracy": float("nan")}, "path": [], "targets": [{"target": "t"}]})
    assert "nan" not in md.lower()
