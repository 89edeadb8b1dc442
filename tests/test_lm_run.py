"""The causal-LM row end to end on a tiny random Llama with a byte tokenizer: search, extract, fine-tune,
evaluate, report, resume, and the perplexity / generate scripts on the saved models. The book texts are
written here (repeated lines in the installed files' formats), so no asset is needed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs.llama import get_config
from spp_jax import checkpoint, run
from spp_jax.data.books import AUSTEN_DB, AUSTEN_OBJECTS, KJV_FILE
from tests.test_books import write_lazyload

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

ROOT = Path(__file__).resolve().parents[1]


def _write_texts(root: Path) -> Path:
    rng = np.random.default_rng(0)
    words = [
        "and",
        "the",
        "of",
        "he",
        "said",
        "unto",
        "them",
        "that",
        "she",
        "was",
        "not",
        "in",
        "his",
        "her",
        "it",
        "be",
        "with",
    ]
    line = lambda: " ".join(rng.choice(words, 12)) + "."
    kjv = [f"Ge{c}:{v} {line()}" for c in range(1, 40) for v in range(1, 8)]
    kjv += [f"Mat{c}:{v} {line()}" for c in range(1, 20) for v in range(1, 8)]
    root.mkdir(parents=True, exist_ok=True)
    (root / KJV_FILE).write_text("\n".join(kjv) + "\n")
    novel = lambda: ["CHAPTER 1", "", *[line() for _ in range(200)]]
    write_lazyload(root / AUSTEN_DB, {obj: novel() for obj in AUSTEN_OBJECTS.values()})
    return root


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPP_JAX_TEXT_DIR", str(_write_texts(root / "text")))
    cfg = get_config("mu")
    cfg.data.data_dir = str(root / "tfds")
    rep = run.run_all(cfg, root / "wd")
    yield cfg, root, rep
    mp.undo()


def test_report_has_perplexities_before_and_after(lm_run):
    cfg, root, rep = lm_run
    assert rep["metric"]["name"] == "perplexity" and not rep["metric"]["higher_is_better"]
    dense = rep["dense"]["perplexity"]
    assert 1.0 < dense < 2 * 256  # a random model over 256 bytes is near uniform, never certain
    for t in rep["targets"]:
        assert math.isfinite(t["perplexity_masked"]) and math.isfinite(t["perplexity_finetuned"])
        assert t["params_frac"] < 1.0 and t["throughput"] > 0
    md = (root / "wd" / "report.md").read_text()
    assert "perplexity masked (before FT)" in md and "tok/s" in md
    assert (root / "wd" / "perplexity_vs_params.png").exists()


def test_rerun_resumes_without_redoing_anything(lm_run):
    cfg, root, rep = lm_run
    before = (root / "wd" / "report.json").read_text()
    again = run.run_all(cfg, root / "wd")
    assert json.loads(before)["targets"] == json.loads(json.dumps(again["targets"]))


def test_saved_models_carry_their_tokenizer_and_score_text(lm_run, tmp_path):
    cfg, root, rep = lm_run
    model_dir = root / "wd" / rep["targets"][0]["dir"]
    assert (model_dir / "tokenizer.json").exists()
    text = tmp_path / "t.txt"
    text.write_text("and the of he said unto them that she was not in his her it be with. " * 4)
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "perplexity.py"), f"--model_dir={model_dir}",
         f"--text_file={text}", "--max_tokens=64"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    value, n = out.stdout.strip().removeprefix("perplexity: ").split(" (")
    assert n == "64 tokens)" and 1.0 < float(value) < 1e4
    # the same number from the library, computed here on the extracted model
    from spp_jax.lm import load_lm, sequence_perplexity

    module, params, tok, _ = load_lm(model_dir)
    ppl, count = sequence_perplexity(module, params, tok, text.read_text(), 64)
    assert count == 64 and float(value) == pytest.approx(ppl, rel=1e-4)
    gen = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "generate.py"), f"--model_dir={model_dir}",
         "--prompt=and the", "--max_new_tokens=5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip().splitlines()[-1].startswith("[generate] ")


def test_extracted_model_is_smaller_and_loads_alone(lm_run):
    cfg, root, rep = lm_run
    module, params, arch = checkpoint.load_pruned(root / "wd" / rep["targets"][0]["dir"])
    _, dense_params, _ = checkpoint.load_pruned(root / "wd" / "dense")
    n = lambda tree: sum(int(np.prod(np.shape(x))) for x in __import__("jax").tree.leaves(tree))
    assert n(params) < n(dense_params)
    logits = module.apply({"params": params}, np.zeros((1, 5), np.int32))
    assert logits.shape == (1, 5, 256)
