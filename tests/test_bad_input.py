"""Bad input to the launch scripts: one line `error: <cause>; <what to do>`, a non-zero exit, no traceback,
and the workdir exactly as it was (no half-written files, no new empty directories).

Every case runs `launch/<script>.py` as a real subprocess (8 fake CPU devices, synthetic Fashion-MNIST IDX
files), in its own directory as the current directory, so a stray default workdir would show up too. One
finished `mu` workdir is built once; cases that corrupt it work on a copy. The subprocesses of all cases run
concurrently in a module-scoped fixture, the parametrised tests assert on the collected results.

docs/errors.md is this file's measured output: regenerate it with
`SPP_WRITE_ERRORS_TABLE=1 python -m pytest tests/test_bad_input.py`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from configs.vit import get_config
from spp_jax import run, run_config
from spp_jax.architectures.vit import ViTArchitecture
from spp_jax.data.fashion_mnist import build
from spp_jax.errors import ConfigError
from spp_jax.stages.context import RunContext
from spp_jax.tasks.image_classification import ImageClassification
from tests.helpers import tree_snapshot, write_synthetic_fashion_mnist

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "vit.py")
BERT = str(ROOT / "configs" / "bert.py")
CLIP = str(ROOT / "configs" / "clip.py")
TABLE = ROOT / "docs" / "errors.md"
WORKERS = 3
TIMEOUT_S = 180


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Paths a case uses: its own directory, the finished run, the shared data directories."""

    case: Path  # the case's directory (current directory of the subprocess)
    wd: Path  # the case's workdir: case/wd (a copy of the finished run, or absent)
    finished: Path  # the finished run (never handed to a subprocess: cases get copies)
    idx: Path  # synthetic IDX files
    tfds: Path  # prepared tfds data_dir
    final_step: int  # the last path point of the finished run
    first_step: int  # the first path point


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    script: str
    shown: str  # the input, as docs/errors.md shows it
    args: Callable[[Ctx], list[str]]
    expect: str | Callable[[Ctx], str]  # a substring of the error line
    setup: Callable[[Ctx], None] | None = None  # prepares case/ (e.g. copies and corrupts the run)
    env: Callable[[Ctx], dict[str, str]] | None = None
    also: tuple[str, ...] = ()  # more substrings of the error line
    asset: bool = False  # reads an installed asset (MiniLM) before it fails: the test is marked `asset`


# ----------------------------------------------------------------------------------------------------------
# Setups
# ----------------------------------------------------------------------------------------------------------


def copy_run(c: Ctx) -> None:
    shutil.copytree(c.finished, c.wd)


def _garble_files(directory: Path) -> None:
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            p.write_bytes(b"\x00garbage\xff" * 7)


def _then(*steps: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        for s in steps:
            s(c)

    setup.steps = steps
    return setup


def _needs_run(case: Case) -> bool:
    """The case works on a copy of the finished run (so it waits until that is built)."""
    return case.setup is copy_run or copy_run in getattr(case.setup, "steps", ())


def _empty_wd(c: Ctx) -> None:
    c.wd.mkdir()


def _garbage_config(c: Ctx) -> None:
    (c.wd / "config.json").write_text("{not json at all")


def _garbage_record(c: Ctx) -> None:
    (c.wd / "search" / "path" / str(c.first_step) / "record" / "metadata").write_text("{not json")


def _garbage_final_arrays(c: Ctx) -> None:
    _garble_files(c.wd / "search" / "path" / str(c.final_step) / "state")


def _garbage_model_params(c: Ctx) -> None:
    _garble_files(c.wd / "extracted" / "params_0.5" / "params")


def _garbage_arch_spec(c: Ctx) -> None:
    (c.wd / "extracted" / "params_0.5" / "arch_spec.json").write_text("{not json")


def _mixed_model(c: Ctx) -> None:
    """The dense model's params under the pruned model's arch_spec.json."""
    model = c.wd / "extracted" / "params_0.5"
    shutil.rmtree(model / "params")
    shutil.copytree(c.wd / "dense" / "params", model / "params")


def _not_a_model(c: Ctx) -> None:
    (c.case / "notamodel").mkdir()
    (c.case / "notamodel" / "weights.bin").write_bytes(b"1234")


def _workdir_is_file(c: Ctx) -> None:
    c.wd.write_text("I am a file\n")


def _empty_idx(c: Ctx) -> None:
    (c.case / "empty_idx").mkdir()


def _texts(c: Ctx) -> None:
    (c.case / "t.txt").write_text("a short text\nanother one\n")


def _texts_with_empty_line(c: Ctx) -> None:
    (c.case / "t.txt").write_text("a short text\n\nanother one\n")


def _empty_texts(c: Ctx) -> None:
    (c.case / "t.txt").write_text("")


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------


def _train(*extra: str, config: str | None = None) -> Callable[[Ctx], list[str]]:
    def args(c: Ctx) -> list[str]:
        cfg = ["--config", config or f"{CONFIG}:mu"] if config != "" else []
        return [*cfg, f"--config.data.data_dir={c.tfds}", "--workdir", str(c.wd), *extra]

    return args


def _on_wd(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["--workdir", str(c.wd), *extra]


def _train_case(cid: str, override: str, expect: str, *also: str) -> Case:
    return Case(cid, "train", f"`{override}`", _train(override), expect, also=also)


def _row_case(cid: str, config: str, overrides: str, expect: str, *also: str, asset: bool = False) -> Case:
    """A train.py case on another row's `:mu` preset (`config`: BERT or CLIP)."""
    shown = f"`--config configs/{Path(config).name}:mu {overrides}`"
    args = _train(*overrides.split(), config=f"{config}:mu")
    return Case(cid, "train", shown, args, expect, also=also, asset=asset)


def _embed(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["--text_file=t.txt", "--out=emb.npy", *extra]


def _embed_case(cid: str, shown: str, extra: tuple[str, ...], expect: str, setup=_texts, **kw) -> Case:
    return Case(cid, "embed", shown, _embed(*extra), expect, setup=setup, **kw)


def _target_case(cid: str, target: str, expect: str) -> Case:
    override = f"--config.extract.targets=('{target}',)"
    return Case(cid, "train", f"`--config.extract.targets=\"('{target}',)\"`", _train(override), expect)


CASES = [
    # -- flags and config overrides -------------------------------------------------------------------
    _train_case("train-unknown-key", "--config.search.foo=1", "unknown config key search.foo"),
    _train_case("train-typo-section", "--config.serach.lr=1", "unknown config key serach.lr", "search.lr"),
    Case(
        "train-config-file-missing",
        "train",
        "`--config configs/no_such.py`",
        _train(config="configs/no_such.py"),
        "config file configs/no_such.py does not exist",
    ),
    Case(
        "train-unknown-preset",
        "train",
        "`--config configs/vit.py:fast`",
        _train(config=f"{CONFIG}:fast"),
        "unknown preset 'fast'",
    ),
    _train_case("train-wrong-type", "--config.seed=abc", "--config.seed=abc is not an integer"),
    Case("train-no-config", "train", "no `--config`", _train(config=""), "--config is required"),
    Case(
        "train-no-flags",
        "train",
        "no flags at all",
        lambda c: [],
        "--config is required",
    ),
    Case(
        "train-unknown-flag",
        "train",
        "`--workdri=x`",
        _train("--workdri=x"),
        "unknown flag --workdri",
        also=("did you mean --workdir?",),
    ),
    _train_case(
        "train-config-flag-typo",
        "--conifg.seed=1",
        "unknown flag --conifg.seed",
        "did you mean --config.seed?",
    ),
    _train_case("train-bool-flag-value", "--fresh_search=maybe", "--fresh_search=maybe is not true or false"),
    _train_case("train-until-unknown", "--until=report", "--until=report is not allowed", "finetune"),
    Case(
        "train-config-file-broken",
        "train",
        "`--config broken.py` (a config file with a syntax error)",
        _train(config="broken.py"),
        "config broken.py cannot be built",
        setup=lambda c: (c.case / "broken.py").write_text("def get_config(arg=None):\n    return {\n"),
    ),
    # -- config values ---------------------------------------------------------------------------------
    _train_case("search-batch-zero", "--config.search.batch_size=0", "search.batch_size=0 is not allowed"),
    _train_case("search-batch-negative", "--config.search.batch_size=-8", "search.batch_size=-8"),
    _train_case("finetune-batch-zero", "--config.finetune.batch_size=0", "finetune.batch_size=0"),
    _train_case("eval-batch-negative", "--config.eval.batch_size=-1", "eval.batch_size=-1"),
    _train_case("search-steps-zero", "--config.search.steps=0", "search.steps=0"),
    _train_case("finetune-steps-negative", "--config.finetune.steps=-2", "finetune.steps=-2"),
    _train_case(
        "search-batch-not-multiple", "--config.search.batch_size=12", "not a multiple of the 8 devices"
    ),
    _train_case("finetune-batch-not-multiple", "--config.finetune.batch_size=4", "finetune.batch_size=4"),
    _train_case("search-lr-negative", "--config.search.lr=-1", "search.lr=-1.0 is not allowed"),
    _train_case("search-kappa-zero", "--config.search.kappa=0", "search.kappa=0.0 is not allowed"),
    _train_case("search-mode-unknown", "--config.search.mode=foo", "search.mode='foo' is not allowed"),
    _train_case("search-path-every-zero", "--config.search.path_every=0", "search.path_every=0"),
    _train_case("search-resume-every-zero", "--config.search.resume_every=0", "search.resume_every=0"),
    _train_case("seed-negative", "--config.seed=-1", "seed=-1"),
    _train_case("finetune-lr-zero", "--config.finetune.lr=0", "finetune.lr=0"),
    _train_case("distill-alpha-out-of-range", "--config.finetune.distill_alpha=2", "finetune.distill_alpha"),
    _train_case("model-variant-unknown", "--config.model.variant=XL/7", "unknown ViT variant 'XL/7'"),
    _train_case("model-pool-unknown", "--config.model.pool=max", "model.pool='max'"),
    _train_case("model-dtype-unknown", "--config.model.dtype=float16", "model.dtype='float16' is not"),
    _train_case("model-attention-cpu", "--config.model.attention=cudnn", "model.attention=cudnn needs a GPU"),
    _train_case("model-image-size-zero", "--config.model.image_size=0", "model.image_size=0"),
    _train_case(
        "model-image-size-not-patch-multiple",
        "--config.model.image_size=18",
        "image_size 18 is not a multiple of patch_size 4",
    ),
    _train_case("model-group-unknown", "--config.model.groups=('qk','ffn')", "'ffn'"),
    Case(
        "model-init-path-missing",
        "train",
        "`--config.model.init=timm --config.model.init_path=no_such.safetensors`",
        _train("--config.model.init=timm", "--config.model.init_path=no_such.safetensors"),
        "model.init_path=no_such.safetensors does not exist",
    ),
    _train_case("dataset-unknown", "--config.data.dataset=no_such_dataset", "no_such_dataset"),
    _train_case("split-bad", "--config.data.train_split=train[:oops]", "train[:oops]"),
    _train_case("split-unknown", "--config.data.eval_split=validation", "'validation'"),
    _train_case("label-key-unknown", "--config.data.label_key=class", "'class'"),
    dataclasses.replace(
        _train_case(
            "search-split-bad", "--config.data.search_split=train[:oops]", "bad split 'train[:oops]'"
        ),
    ),
    dataclasses.replace(
        _train_case("image-key-unknown", "--config.data.image_key=img", "data.image_key='img'"),
    ),
    dataclasses.replace(
        _train_case(
            "search-batch-above-split-size",
            "--config.search.batch_size=512",
            "search.batch_size=512 is more than the 256 examples",
        ),
    ),
    _train_case("round-to-zero", "--config.extract.round_to=0", "extract.round_to=0"),
    _train_case("targets-empty", "--config.extract.targets=()", "extract.targets=()"),
    Case(
        "lasso-penalty-negative",
        "train",
        '`--config.extract.lasso_penalties="(1.0,-1.0)"`',
        _train("--config.extract.lasso_penalties=(1.0,-1.0)"),
        "extract.lasso_penalties=(1.0, -1.0) is not allowed",
    ),
    # -- targets ---------------------------------------------------------------------------------------
    _target_case("target-fraction-above-one", "params:1.5", "1.5"),
    _target_case("target-fraction-negative", "params:-1", "-1"),
    _target_case("target-step-negative", "step:-3", "-3"),
    _target_case("target-keeps-nothing", "params:0", "keeps no block dims"),
    _target_case("target-unparsable", "foo:0.5", "'foo:0.5'"),
    # -- workdir, assets -------------------------------------------------------------------------------
    Case(
        "rerun-other-search-lr",
        "train",
        "finished workdir, `--config.search.lr=0.1`",
        _train("--config.search.lr=0.1"),
        "search.lr=0.3",
        setup=copy_run,
        also=("search.lr=0.1", "--fresh_search"),
    ),
    Case(
        "rerun-other-model",
        "train",
        "finished workdir, `--config.model.groups=\"('qk','vo','mlp','heads')\"`",
        _train("--config.model.groups=('qk','vo','mlp','heads')"),
        "model.groups=('qk', 'vo', 'mlp')",
        setup=copy_run,
        also=("model.groups=('qk', 'vo', 'mlp', 'heads')", "new --workdir"),
    ),
    Case(
        "rerun-other-data",
        "train",
        "finished workdir, `--config.data.train_split=train[:128]`",
        _train("--config.data.train_split=train[:128]"),
        "data.train_split",
        setup=copy_run,
        also=("new --workdir",),
    ),
    Case(
        "workdir-is-a-file",
        "train",
        "`--workdir` is a regular file",
        _train(),
        "is a file, not a directory",
        setup=_workdir_is_file,
    ),
    Case(
        "fashion-mnist-missing",
        "train",
        "`SPP_FASHION_MNIST_DIR` is an empty directory, fresh `data_dir`",
        lambda c: [
            "--config",
            f"{CONFIG}:mu",
            f"--config.data.data_dir={c.case / 'tfds'}",
            "--workdir",
            str(c.wd),
        ],
        "apt-get install",
        setup=_empty_idx,
        env=lambda c: {"SPP_FASHION_MNIST_DIR": str(c.case / "empty_idx")},
    ),
    # -- extract.py ------------------------------------------------------------------------------------
    Case(
        "extract-no-workdir",
        "extract",
        "`--workdir` does not exist",
        _on_wd("--target", "params:0.5"),
        "does not exist",
    ),
    Case(
        "extract-no-config-json",
        "extract",
        "workdir without config.json",
        _on_wd("--target", "params:0.5"),
        "config.json not found",
        setup=_empty_wd,
    ),
    Case(
        "extract-garbage-config-json",
        "extract",
        "config.json holds garbage",
        _on_wd("--target", "params:0.5"),
        "is not a valid config",
        setup=_then(copy_run, _garbage_config),
    ),
    Case(
        "extract-no-target",
        "extract",
        "no `--target`",
        _on_wd(),
        "--target",
        setup=copy_run,
    ),
    Case(
        "extract-unparsable-target",
        "extract",
        "`--target params=0.5`",
        _on_wd("--target", "params=0.5"),
        "cannot parse selection target 'params=0.5'",
        setup=copy_run,
    ),
    Case(
        "extract-round-to-not-integer",
        "extract",
        "`--round_to=abc`",
        _on_wd("--target", "params:0.5", "--round_to=abc"),
        "--round_to=abc is not an integer",
        setup=copy_run,
    ),
    Case(
        "extract-unreachable",
        "extract",
        "`--target flops:0.001`",
        _on_wd("--target", "flops:0.001"),
        "smallest reachable",
        setup=copy_run,
    ),
    Case(
        "extract-no-such-step",
        "extract",
        "`--target step:99999`",
        _on_wd("--target", "step:99999"),
        "no path point at step 99999",
        setup=copy_run,
    ),
    Case(
        "extract-round-to-zero",
        "extract",
        "`--round_to 0`",
        _on_wd("--target", "params:0.5", "--round_to", "0"),
        "--round_to=0 is not allowed",
        setup=copy_run,
    ),
    Case(
        "extract-garbage-record",
        "extract",
        "path point's record metadata is garbage JSON, `--target step:<that step>`",
        lambda c: ["--workdir", str(c.wd), "--target", f"step:{c.first_step}"],
        lambda c: f"path point {c.first_step}",
        setup=_then(copy_run, _garbage_record),
        also=("is corrupt",),
    ),
    Case(
        "extract-garbage-arrays",
        "extract",
        "final path point's array files are garbage, `--target params:0.5`",
        _on_wd("--target", "params:0.5"),
        lambda c: f"path point {c.final_step}",
        setup=_then(copy_run, _garbage_final_arrays),
        also=("is corrupt",),
    ),
    # -- finetune.py -----------------------------------------------------------------------------------
    Case(
        "finetune-not-a-model",
        "finetune",
        "`--model_dir` is not a saved model",
        lambda c: ["--workdir", str(c.wd), "--model_dir", str(c.case / "notamodel")],
        "has no arch_spec.json",
        setup=_then(copy_run, _not_a_model),
    ),
    Case(
        "finetune-steps-zero",
        "finetune",
        "`--steps 0`",
        lambda c: [
            "--workdir",
            str(c.wd),
            "--model_dir",
            str(c.wd / "extracted" / "params_0.5"),
            "--steps=0",
        ],
        "--steps=0 is not allowed",
        setup=copy_run,
    ),
    Case(
        "finetune-corrupt-params",
        "finetune",
        "model dir whose `params/` files are garbage",
        lambda c: ["--workdir", str(c.wd), "--model_dir", str(c.wd / "extracted" / "params_0.5")],
        "params cannot be read",
        setup=_then(copy_run, _garbage_model_params),
    ),
    # -- evaluate.py -----------------------------------------------------------------------------------
    Case(
        "evaluate-garbage-arch-spec",
        "evaluate",
        "model dir whose arch_spec.json is garbage JSON",
        lambda c: ["--workdir", str(c.wd), "--model_dir", str(c.wd / "extracted" / "params_0.5")],
        "arch_spec.json or meta.json is corrupt",
        setup=_then(copy_run, _garbage_arch_spec),
    ),
    Case(
        "evaluate-param-count-mismatch",
        "evaluate",
        "model dir holding the dense params under a pruned arch_spec.json",
        lambda c: ["--workdir", str(c.wd), "--model_dir", str(c.wd / "extracted" / "params_0.5")],
        "describes",
        setup=_then(copy_run, _mixed_model),
    ),
    Case(
        "evaluate-no-model-dir",
        "evaluate",
        "no `--model_dir`",
        _on_wd(),
        "--model_dir is required",
        setup=copy_run,
    ),
    Case(
        "evaluate-one-of-two-bad",
        "evaluate",
        "two `--model_dir`, the second is not a saved model",
        lambda c: ["--workdir", str(c.wd), "--model_dir", str(c.wd / "dense"), "--model_dir", "notamodel"],
        "notamodel has no arch_spec.json",
        setup=_then(copy_run, _not_a_model),
    ),
    # -- the architecture / task registries, perplexity.py and generate.py ------------------------------
    _train_case("train-unknown-arch", "--config.model.arch=convnext", "model.arch='convnext' is unknown"),
    _train_case("train-unknown-task", "--config.task=segmentation", "task='segmentation' is unknown"),
    Case(
        "train-swin-checkpoint-missing",
        "train",
        "`--config configs/swin.py:mu --config.model.init=timm` (no init_path)",
        _train("--config.model.init=timm", config=str(ROOT / "configs" / "swin.py") + ":mu"),
        "give the timm Swin checkpoint file",
    ),
    Case(
        "train-swin-unknown-variant",
        "train",
        "`--config configs/swin.py:mu --config.model.variant=XL`",
        _train("--config.model.variant=XL", config=str(ROOT / "configs" / "swin.py") + ":mu"),
        "model.variant='XL' is not allowed",
    ),
    Case(
        "perplexity-no-text-file",
        "perplexity",
        "`--text_file no_such.txt`",
        lambda c: ["--text_file=no_such.txt"],
        "--text_file=no_such.txt is not a file",
    ),
    Case(
        "perplexity-too-few-tokens",
        "perplexity",
        "`--max_tokens 1`",
        lambda c: ["--text_file=t.txt", "--max_tokens=1"],
        "--max_tokens=1 is not allowed",
        setup=lambda c: (c.case / "t.txt").write_text("a few words"),
    ),
    Case(
        "generate-model-without-tokenizer",
        "generate",
        "`--model_dir` of an image classifier (no tokenizer.json)",
        lambda c: ["--model_dir", str(c.wd / "extracted" / "params_0.5"), "--prompt=hello"],
        "has no tokenizer.json",
        setup=copy_run,
    ),
    # -- the BERT row (configs/bert.py) and embed.py ---------------------------------------------------
    _row_case(
        "bert-hf-no-init-path", BERT, "--config.model.init=hf", "model.init_path='' is not a directory"
    ),
    _row_case(
        "bert-hf-init-path-missing",
        BERT,
        "--config.model.init=hf --config.model.init_path=no_such_dir",
        "model.init_path='no_such_dir' is not a directory",
    ),
    _row_case("bert-variant-unknown", BERT, "--config.model.variant=bert-huge", "model.variant='bert-huge'"),
    _row_case("bert-pool-unknown", BERT, "--config.model.pool=max", "model.pool='max' is not allowed"),
    _row_case(
        "bert-dataset-not-bbc-news",
        BERT,
        "--config.data.dataset=fashion_mnist",
        "data.dataset='fashion_mnist' is not allowed",
        "bbc_news",
    ),
    _row_case(
        "bert-seq-len-above-positions",
        BERT,
        "--config.model.init=minilm --config.model.seq_len=513",
        "model.seq_len=513 is more than the 512 position embeddings",
        asset=True,
    ),
    Case(
        "embed-no-text-file",
        "embed",
        "no `--text_file`",
        lambda c: ["--out=emb.npy"],
        "--text_file is required",
    ),
    Case(
        "embed-text-file-missing",
        "embed",
        "`--text_file no_such.txt`",
        lambda c: ["--text_file=no_such.txt", "--out=emb.npy"],
        "--text_file=no_such.txt is not a file",
    ),
    _embed_case(
        "embed-empty-line",
        "`--text_file` whose second line is empty",
        (),
        "t.txt has empty lines ([2])",
        setup=_texts_with_empty_line,
    ),
    _embed_case(
        "embed-empty-file", "`--text_file` is an empty file", (), "the file is empty", setup=_empty_texts
    ),
    Case(
        "embed-out-dir-missing",
        "embed",
        "`--out no_such_dir/emb.npy`",
        lambda c: ["--text_file=t.txt", "--out=no_such_dir/emb.npy"],
        "directory no_such_dir does not exist",
        setup=_texts,
    ),
    _embed_case("embed-batch-zero", "`--batch_size 0`", ("--batch_size=0",), "--batch_size=0 is not allowed"),
    _embed_case(
        "embed-config-not-text",
        "`--config configs/vit.py:mu`",
        ("--config", f"{CONFIG}:mu"),
        "model.arch is 'vit'",
    ),
    _embed_case(
        "embed-not-a-model",
        "`--model_dir` is not a saved model",
        ("--model_dir=notamodel",),
        "notamodel has no arch_spec.json",
        setup=_then(_texts, _not_a_model),
    ),
    Case(
        "embed-image-model",
        "embed",
        "`--model_dir` of an image classifier (no tokenizer.json)",
        lambda c: [*_embed()(c), "--model_dir", str(c.wd / "extracted" / "params_0.5")],
        "has no tokenizer.json",
        setup=_then(copy_run, _texts),
    ),
    _embed_case(
        "embed-max-tokens-one",
        "`--max_tokens 1` (the default config's MiniLM)",
        ("--max_tokens=1",),
        "max_tokens=1 is outside [2, 512]",
        asset=True,
    ),
    # -- the two-tower CLIP row (configs/clip.py) -----------------------------------------------------
    _row_case(
        "clip-curvature-chunks-not-divisor",
        CLIP,
        "--config.search.curvature_chunks=3",
        "search.curvature_chunks=3 needs",
        "a divisor of search.batch_size=16",
    ),
    _row_case(
        "clip-curvature-chunks-official-mode",
        CLIP,
        "--config.search.mode=official",
        "search.curvature_chunks=4 needs search.mode=curvature",
        "use 0",
    ),
    _row_case(
        "clip-hf-init-path-missing",
        CLIP,
        "--config.model.init=hf --config.model.init_path=no_such_dir",
        "model.init_path='no_such_dir' does not exist",
    ),
    _row_case(
        "clip-image-groups-unknown",
        CLIP,
        "--config.model.image_groups=('qk','ffn')",
        "model.image_groups=('qk', 'ffn') is not allowed",
    ),
    _row_case(
        "clip-text-groups-repeated",
        CLIP,
        "--config.model.text_groups=('mlp','mlp')",
        "model.text_groups=('mlp', 'mlp') is not allowed",
    ),
]
assert len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------------------------------------
# Running them
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    case: Case
    ctx: Ctx
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    before: dict
    after: dict
    seconds: float


def _run_case(case: Case, ctx: Ctx, base_env: dict[str, str]) -> Result:
    ctx.case.mkdir(parents=True)
    if case.setup is not None:
        case.setup(ctx)
    before = tree_snapshot(ctx.case)
    argv = [sys.executable, str(ROOT / "launch" / f"{case.script}.py"), *case.args(ctx)]
    env = {**base_env, **(case.env(ctx) if case.env else {})}
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=ctx.case, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    seconds = time.perf_counter() - t0
    return Result(case, ctx, argv, p.returncode, p.stdout, p.stderr, before, tree_snapshot(ctx.case), seconds)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case's result; the cases that need no finished run go while it is being built."""
    base = tmp_path_factory.mktemp("bad_input")
    idx, tfds, finished = base / "idx", base / "tfds", base / "finished"
    idx.mkdir()
    write_synthetic_fashion_mnist(idx)
    build(tfds, source_dir=idx)  # the tfds data once, before any case reads it
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "SPP_FASHION_MNIST_DIR": str(idx),
    }
    env.pop("TFDS_DATA_DIR", None)

    def start(pool, case: Case, steps: list[int]):
        d = base / "cases" / case.id
        ctx = Ctx(d, d / "wd", finished, idx, tfds, steps[-1], steps[0])
        return pool.submit(_run_case, case, ctx, env)

    with ThreadPoolExecutor(WORKERS) as pool:
        early = [start(pool, c, [-1]) for c in CASES if not _needs_run(c)]
        mp = pytest.MonkeyPatch()
        mp.setenv("SPP_FASHION_MNIST_DIR", str(idx))
        try:
            cfg = get_config("mu")
            cfg.data.data_dir = str(tfds)
            cfg.extract.targets = ("params:0.5",)
            report = run.run_all(cfg, finished)
        finally:
            mp.undo()
        steps = [p["step"] for p in report["path"]]
        late = [start(pool, c, steps) for c in CASES if _needs_run(c)]
        out = {f.result().case.id: f.result() for f in early + late}
    out = {c.id: out[c.id] for c in CASES}
    if os.environ.get("SPP_WRITE_ERRORS_TABLE"):
        TABLE.write_text(errors_table(out.values()))
    return out


def error_lines(stderr: str) -> tuple[list[str], list[str]]:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines, [ln for ln in lines if ln.startswith("error: ")]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.asset] if c.asset else []) for c in CASES]
)
def test_bad_input_is_one_line_and_leaves_the_workdir(results, case):
    r = results[case.id]
    lines, errors = error_lines(r.stderr)
    shown = f"argv: {r.argv}\nexit {r.returncode}\nstderr:\n{r.stderr[-4000:]}\nstdout:\n{r.stdout[-2000:]}"
    assert r.returncode != 0, shown
    assert "Traceback" not in r.stderr + r.stdout, shown
    assert "Event loop is closed" not in r.stderr + r.stdout, shown
    assert len(errors) == 1, shown
    assert lines[-1] == errors[0], shown
    assert re.fullmatch(r"error: .+; .+", errors[0]), shown
    expect = case.expect(r.ctx) if callable(case.expect) else case.expect
    for s in (expect, *case.also):
        assert s in errors[0], shown
    assert r.after == r.before, f"{shown}\nchanged: {sorted(set(r.before.items()) ^ set(r.after.items()))}"
    if not r.before.get("wd"):
        assert not r.ctx.wd.exists()


# ----------------------------------------------------------------------------------------------------------
# docs/errors.md
# ----------------------------------------------------------------------------------------------------------


def _abbreviate(text: str, ctx: Ctx) -> str:
    """Workdir-independent text: the case's paths relative to its directory (the current directory)."""
    text = text.replace(str(ctx.wd), "WORKDIR").replace(str(ctx.tfds), "DATA_DIR")
    for d in (ctx.case, ROOT):
        text = text.replace(f"{d}/", "").replace(str(d), ".")
    return text


def errors_table(rs) -> str:
    head = [
        "# Errors on bad input",
        "",
        "Every bad input to a launch script ends in exactly one line `error: <cause>; <what to do>` on "
        "stderr and a non-zero exit (1; 2 for flag mistakes), with no traceback, and leaves the workdir "
        "exactly as it was: no half-written files, no new empty directories (a workdir that did not exist "
        "is not created). SIGTERM and SIGINT are not errors: the run stops at the end of the current "
        "search step with its resume state saved and exits 0 (SIGTERM) or 130 (SIGINT); rerunning the "
        "same command continues.",
        "",
        "A NaN/Inf loss during the search is reported the same way, with the advice the workdir accepts: "
        "`error: search loss became NaN/Inf at step K (path points up to step J kept); rerun with a lower "
        "--config.search.lr plus --fresh_search (the old search moves to discarded/), or check the input "
        "data` (without `--fresh_search` when no point was saved yet); `tests/test_run.py` runs that advice.",
        "",
        "A second `launch/train.py` on a workdir that a live run holds is refused the same way, before it"
        " changes anything: `error: workdir WORKDIR is in use by a running run (pid N on host H); wait "
        "for it to end (or stop it), or give another --workdir`. The lock (`WORKDIR/.lock`, an "
        "`fcntl.flock`) ends with its process, so a killed run leaves none behind; `tests/test_faults.py`"
        " checks both.",
        "",
        "A full disk while saving stops the run the same way: `error: disk full while saving path point K"
        " to WORKDIR/search/path (No space left on device); free space on that disk, then rerun the same "
        "command to resume (everything saved before is intact)` (or `resume state K to "
        "WORKDIR/search/resume`, `the model to WORKDIR/dense`, ...; another failed write reads `cannot "
        "save ... (<cause>); fix that (permissions, disk), then ...`). The points and models saved before"
        " stay readable and the rerun resumes; `tests/test_faults.py` fills the disk during each kind of "
        "save.",
        "",
        "The table is the measured output of `tests/test_bad_input.py` (one row per case; `WORKDIR` is the "
        "run's `--workdir`, `DATA_DIR` the tfds `data_dir`); regenerate it with "
        "`SPP_WRITE_ERRORS_TABLE=1 python -m pytest tests/test_bad_input.py`.",
        "",
        "| script | input | exit | error line | workdir |",
        "|---|---|---|---|---|",
    ]
    rows = []
    for r in rs:
        lines, errors = error_lines(r.stderr)
        raised = [ln for ln in lines if re.match(r"[\w.]*(Error|Exception)\b", ln)]
        line = (
            errors[0] if errors else f"(no error line; a traceback ending in {(raised or lines or [''])[-1]})"
        )
        line, shown = (_abbreviate(x, r.ctx).replace("|", "\\|") for x in (line, r.case.shown))
        kept = "untouched" if r.after == r.before else "**changed**"
        rows.append(f"| {r.case.script}.py | {shown} | {r.returncode} | `` {line} `` | {kept} |")
    return "\n".join(head + rows) + "\n"


def test_check_inputs_names_the_key_and_the_fix(tmp_path):
    """run_config.check_inputs, which run_all calls before it creates the workdir."""
    cfg = get_config("mu")
    train = [{"image": np.zeros((28, 28, 1), np.uint8), "label": 0}] * 64

    def check_inputs(c, train_src, search_src, dense_done=False):
        task = ImageClassification(c)
        ctx = RunContext(c, task, ViTArchitecture(), None, train_src, [], search_src)
        run_config.check_inputs(ctx, dense_done=dense_done)

    check_inputs(cfg, train, train)
    for change, src, dense_done, message in [
        ({"model.init": "timm"}, train, False, "model.init=timm needs a checkpoint file; set"),
        ({"model.init": "timm"}, train, True, None),  # a finished dense stage reads no checkpoint
        (
            {"model.init": "big_vision", "model.init_path": str(tmp_path / "x.npz")},
            train,
            False,
            "x.npz does",
        ),
        ({"search.batch_size": 128}, train, False, "search.batch_size=128 is more than the 64 examples"),
        ({"finetune.batch_size": 72}, train, False, "data.train_split='train[:256]'"),
        ({"data.image_key": "img"}, train, False, "data.image_key='img' is not a feature"),
        ({"data.label_key": "y"}, train, False, "use one of ['image', 'label']"),
    ]:
        c = get_config("mu")
        for key, value in change.items():
            section, name = key.split(".")
            c[section][name] = value
        if message is None:
            check_inputs(c, src, src, dense_done=dense_done)
            continue
        with pytest.raises(ConfigError, match=re.escape(message)) as e:
            check_inputs(c, src, src, dense_done=dense_done)
        assert re.fullmatch(r".+; .+", str(e.value)), e.value
    cfg.data.search_split = "train[:8]"
    with pytest.raises(ConfigError, match=re.escape("data.search_split='train[:8]'")):
        check_inputs(cfg, train, search_src=train[:8])


def test_docs_errors_table_is_current(results):
    assert TABLE.read_text() == errors_table(results.values()), (
        "docs/errors.md differs from the measured errors; regenerate it with "
        "SPP_WRITE_ERRORS_TABLE=1 python -m pytest tests/test_bad_input.py"
    )
