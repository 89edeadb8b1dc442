"""The image-text row: the multi-positive contrastive loss against a direct numpy statement, zero-shot and
recall definitions, micro-batch curvature, and configs/clip.py:mu end to end (a tiny random two-tower model,
MiniLM's tokenizer, synthetic Fashion-MNIST-format images)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.clip import get_config
from spp_jax import checkpoint, run, search
from spp_jax.tasks.image_text import (
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    ImageText,
    captions,
    class_scores,
    multi_positive_loss,
)
from tests.helpers import write_synthetic_fashion_mnist


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_multi_positive_loss_matches_its_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 8)).astype(np.float32)
    labels = np.array([0, 1, 1, 2, 0, 1])
    text_labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # class 3 has no image in the batch
    i2t = []
    for i in range(6):  # image i: uniform target over the captions of its class
        pos = text_labels == labels[i]
        i2t.append(-_log_softmax(logits[i])[pos].mean())
    t2i = []
    for j in range(8):  # caption j: uniform over the batch's images of its class, skipped if none
        pos = labels == text_labels[j]
        if pos.any():
            t2i.append(-_log_softmax(logits[:, j])[pos].mean())
    want = 0.5 * (np.mean(i2t) + np.mean(t2i))
    got = multi_positive_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(text_labels))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_distillation_matches_the_teacher_similarities_both_ways():
    rng = np.random.default_rng(1)

    def outputs():
        emb = lambda n: (e := rng.normal(size=(n, 4)).astype(np.float32)) / np.linalg.norm(e, axis=1)[:, None]
        return emb(5), emb(7), np.float32(3.0)

    student, teacher, temp = outputs(), outputs(), 2.0

    def kl_rows(s, t):  # mean over rows of T^2 KL(softmax(t/T) || softmax(s/T))
        lt, ls = _log_softmax(t / temp), _log_softmax(s / temp)
        return temp**2 * (np.exp(lt) * (lt - ls)).sum(-1).mean()

    s = student[2] * student[0] @ student[1].T
    t = teacher[2] * teacher[0] @ teacher[1].T
    want = 0.5 * (kl_rows(s, t) + kl_rows(s.T, t.T))  # images over captions, captions over images
    got = ImageText().distill_loss(student, teacher, {}, temp)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert float(ImageText().distill_loss(teacher, teacher, {}, temp)) == pytest.approx(0.0, abs=1e-6)


def test_zero_shot_uses_the_mean_prompt_of_each_class():
    text = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]  # class 0: prompts e0, e1; class 1: e2, e3
    image = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.2, 1.0, 0.0]], np.float32)
    scores = np.asarray(class_scores(jnp.asarray(image), jnp.asarray(text), num_classes=2))
    assert scores.argmax(1).tolist() == [0, 1]
    np.testing.assert_allclose(scores[0, 0], np.sqrt(2.0), rtol=1e-6)  # e0 + e1 normalised: cos * |image|


def test_train_and_eval_prompts_are_disjoint_and_class_major():
    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)
    texts = captions(TRAIN_TEMPLATES, ("cat", "dog"))
    assert texts[: len(TRAIN_TEMPLATES)] == [t.format("cat") for t in TRAIN_TEMPLATES]


@pytest.mark.slow
def test_micro_batch_curvature_with_one_example_per_chunk_is_the_per_example_one():
    from spp_jax.architectures.vit import ViTArchitecture
    from spp_jax.tasks.image_classification import ImageClassification

    adapter, params, (images,) = ViTArchitecture().tiny_example(None, seed=0)
    masks = {g.name: jnp.ones((g.depth, g.size)) * 0.9 for g in adapter.mask_spec().groups}
    batch = {"image": images, "label": jnp.array([1, 3])}
    task, apply = ImageClassification(), adapter.module().apply
    (l1, _), g1 = search.per_example_mask_gradients(apply, task, params, masks, batch)
    (l2, _), g2 = search.per_example_mask_gradients(apply, task, params, masks, batch, chunks=2)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for k in masks:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-5, atol=1e-7)
    (l3, _), g3 = search.per_example_mask_gradients(apply, task, params, masks, batch, chunks=1)
    assert l3.shape == (1,)
    np.testing.assert_allclose(l3[0], l1.mean(), rtol=1e-5)  # one chunk: the batch's own loss and gradient
    for k in masks:
        np.testing.assert_allclose(g3[k][0], g1[k].mean(0), rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    idx = tmp_path_factory.mktemp("idx")
    write_synthetic_fashion_mnist(idx)
    mp = pytest.MonkeyPatch()
    mp.setenv("SPP_FASHION_MNIST_DIR", str(idx))
    cfg = get_config("mu")
    cfg.search.curvature_chunks = 4  # as the default config: curvature from micro-batches
    cfg.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds_clip")
    wd = tmp_path_factory.mktemp("clip")
    report = run.run_all(cfg, wd)
    yield cfg, wd, report
    mp.undo()


@pytest.mark.slow
@pytest.mark.asset  # MiniLM's tokenizer
def test_the_run_prunes_both_towers_and_reports_recall(clip_run):
    cfg, wd, report = clip_run
    groups = {f"{t}/{k}" for t in ("image", "text") for k in cfg.model.image_groups}
    assert set(report["path"][-1]["support"]) == groups | {"all"}
    for t in report["targets"]:
        assert set(t["extra_masked"]) == set(t["extra_finetuned"]) == {"i2t R@1", "t2i R@1"}
        assert all(0.0 <= v <= 1.0 for v in t["extra_masked"].values())
        assert set(t["layers"]) == {"image", "text"}
    assert "i2t R@1" in (wd / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.asset
def test_the_dense_stage_trained_only_projections_and_temperature(clip_run):
    cfg, wd, _ = clip_run
    from spp_jax.architectures.clip import ClipArchitecture

    arch = ClipArchitecture()
    init = arch.load_pretrained(cfg, arch.build_adapter(cfg))
    _, dense, _ = checkpoint.load_pruned(wd / "dense")
    changed = {k for k in init if not all(jax.tree.leaves(jax.tree.map(np.array_equal, init[k], dense[k])))}
    assert changed == {"image_proj", "text_proj", "logit_scale"}


@pytest.mark.slow
@pytest.mark.asset
def test_saved_two_tower_models_embed_alone(clip_run):
    cfg, wd, _ = clip_run
    images = np.random.default_rng(0).normal(size=(3, cfg.model.image_size, cfg.model.image_size, 3))
    ids = np.full((2, cfg.model.seq_len), 5, np.int32)
    for d in sorted((wd / "finetuned").iterdir()):
        module, params, spec = checkpoint.load_pruned(d)
        assert spec["arch"] == "clip" and (d / "tokenizer.json").exists()
        img, txt, scale = module.apply({"params": params}, images.astype(np.float32), ids, np.ones_like(ids))
        assert img.shape[0] == 3 and txt.shape[0] == 2 and float(scale) > 0
        np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.asset
def test_a_second_run_resumes_without_recomputing(clip_run):
    cfg, wd, report = clip_run
    again = run.run_all(cfg, wd)
    key = lambda r: [(t["target"], t["accuracy_masked"], t["accuracy_finetuned"]) for t in r["targets"]]
    assert key(again) == key(report)
