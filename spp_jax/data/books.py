"""Public-domain books as an offline tfds builder of fixed-length token blocks (array_record).

Raw text (installed by ``bash setup.sh`` into the text dir: ``$SPP_JAX_TEXT_DIR``, else
``${XDG_CACHE_HOME:-~/.cache}/spp_jax/books``), from three Debian bookworm packages unpacked with
``dpkg -x`` (no R, no package install)::

    kjv.txt         the King James Bible, one verse a line ("Ge1:1 In the beginning ..."), dumped
                    by bible-kjv's ``bible -f gen1:1-rev22:21`` run in ``bible-kjv/usr/lib``
    janeaustenr/    r-cran-janeaustenr: the six novels as character vectors (one line each) in the
                    R lazy-load database ``usr/lib/R/site-library/janeaustenr/data/Rdata.{rdb,rdx}``

Plain text per book (``read_books``): ``kjv_old`` (Genesis-Malachi) and ``kjv_new`` (Matthew-
Revelation) with the verse references removed, one paragraph per chapter; the novels with their
hard line wraps joined, one paragraph per blank-line-separated block (title pages and chapter
headings, ``_italics_`` marks and the closing "A NOTE ON THE TEXT" of Northanger Abbey kept).
Paragraphs are separated by a blank line; whitespace inside a paragraph is collapsed to one space.

Blocks (``SppBooks``): each book is tokenised as one text without special tokens; ``bos_id``, if
given, is prepended once to the book's stream; the stream is cut into non-overlapping blocks of
``block_len`` tokens and the remainder dropped. One split per book, named as in ``BOOKS``, blocks in
reading order. The builder config name encodes the block length, a hash of the tokenizer JSON and
the BOS id, so each (tokenizer, block_len, bos_id) has its own cache.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from spp_jax.data.fashion_mnist import _file_lock, _is_prepared
from spp_jax.data.pipeline import _as_data_source
from spp_jax.errors import AssetNotInstalled, ConfigError

TEXT_DIR_ENV = "SPP_JAX_TEXT_DIR"
KJV_FILE = "kjv.txt"
AUSTEN_DB = "janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata"
# book name -> R object name in the janeaustenr lazy-load database
AUSTEN_OBJECTS = {
    "sense": "sensesensibility",
    "pride": "prideprejudice",
    "mansfield": "mansfieldpark",
    "emma": "emma",
    "northanger": "northangerabbey",
    "persuasion": "persuasion",
}
BOOKS = ("kjv_old", "kjv_new", *AUSTEN_OBJECTS)
TOKENS_KEY = "tokens"
BOOK_KEY = "book"
NEW_TESTAMENT_FIRST = "Mat"  # the bible program's abbreviation of Matthew
_INSTALL_HINT = f"run `bash setup.sh` (or set {TEXT_DIR_ENV} to a dir holding them)"
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def resolve_text_dir(source_dir: str | os.PathLike[str] | None = None) -> Path:
    """Text dir: the argument, else ``$SPP_JAX_TEXT_DIR``, else ``$XDG_CACHE_HOME/spp_jax/books``."""
    if source_dir or os.environ.get(TEXT_DIR_ENV):
        return Path(source_dir or os.environ[TEXT_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "spp_jax" / "books"


def _corrupt(path: Path, reason: str) -> AssetNotInstalled:
    return AssetNotInstalled(f"corrupt book text {path} ({reason}); delete it and re-run `bash setup.sh`")


def _paragraphs(blocks: Sequence[str]) -> str:
    """Joins paragraphs with a blank line, collapsing the whitespace inside each one."""
    return "\n\n".join(p for p in (" ".join(b.split()) for b in blocks) if p)


def read_kjv(path: Path) -> dict[str, str]:
    """``kjv.txt`` (``bible -f`` output, "Ge1:1 text" a line) -> ``{"kjv_old", "kjv_new"}`` prose."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AssetNotInstalled(f"King James Bible text {path} not found; {_INSTALL_HINT}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _corrupt(path, type(e).__name__) from None
    chapters: dict[str, list[list[str]]] = {"kjv_old": [], "kjv_new": []}
    testament, last = "kjv_old", None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        m = _VERSE.match(line)
        if m is None:
            raise _corrupt(path, f"line {n} is not 'BookC:V text': {line[:40]!r}")
        book, chapter, _, text = m.groups()
        if book == NEW_TESTAMENT_FIRST:
            testament = "kjv_new"
        if (book, chapter) != last:
            chapters[testament].append([])
            last = (book, chapter)
        chapters[testament][-1].append(text)
    if not lines or not lines[0].startswith("Ge1:1 ") or not chapters["kjv_new"]:
        raise _corrupt(path, f"want Genesis 1:1 first and {NEW_TESTAMENT_FIRST}thew after it")
    return {name: _paragraphs([" ".join(c) for c in chs]) for name, chs in chapters.items()}


def _r_decompress(blob: bytes, path: Path) -> bytes:
    """One R serialization blob: gzip (an ``.rdx``) or R's ``[len: u32 BE][type?][data]``."""
    try:
        if blob[:2] == b"\x1f\x8b":
            return gzip.decompress(blob)
        size = int.from_bytes(blob[:4], "big")
        kind, body = blob[4:5], blob[5:]
        if kind == b"Z":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"X":
            out = lzma.decompress(body)
        elif kind == b"0":
            out = body
        else:  # plain zlib, R's default `compress = TRUE`
            out = zlib.decompress(blob[4:])
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise _corrupt(path, f"cannot decompress: {type(e).__name__}") from None
    if len(out) != size:
        raise _corrupt(path, f"decompressed {len(out)} bytes, header says {size}")
    return out


def _r_object(raw: bytes, path: Path) -> Any:
    import rdata

    try:
        with warnings.catch_warnings():  # "Unknown file type: assumed RDS": lazy-load blobs have no magic
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))
    except Exception as e:  # rdata raises many kinds on a bad stream
        raise _corrupt(path, f"not an R serialization: {type(e).__name__}") from None


def read_lazyload(prefix: Path, names: Sequence[str]) -> dict[str, Any]:
    """Reads objects ``names`` from the R lazy-load database ``prefix.rdb``/``prefix.rdx``."""
    rdx, rdb = prefix.with_name(prefix.name + ".rdx"), prefix.with_name(prefix.name + ".rdb")
    try:
        index_blob, data = rdx.read_bytes(), rdb.read_bytes()
    except FileNotFoundError as e:
        raise AssetNotInstalled(f"Jane Austen database {e.filename} not found; {_INSTALL_HINT}") from None
    index = _r_object(_r_decompress(index_blob, rdx), rdx)
    variables = index.get("variables", {}) if isinstance(index, dict) else {}
    out = {}
    for name in names:
        if name not in variables:
            raise _corrupt(rdx, f"no object {name!r}")
        offset, length = (int(v) for v in variables[name])
        if offset < 0 or length < 5 or offset + length > len(data):
            raise _corrupt(rdb, f"object {name!r} at {offset}+{length} is outside the file")
        out[name] = _r_object(_r_decompress(data[offset : offset + length], rdb), rdb)
    return out


def read_austen(source_dir: Path) -> dict[str, str]:
    """The six novels as prose (hard-wrapped lines joined into paragraphs)."""
    prefix = source_dir / AUSTEN_DB
    objects = read_lazyload(prefix, list(AUSTEN_OBJECTS.values()))
    books = {}
    for book, name in AUSTEN_OBJECTS.items():
        lines = np.asarray(objects[name], dtype=object).reshape(-1)
        paragraphs, current = [], []
        for line in lines:
            line = "" if line is None else str(line)
            if line.strip():
                current.append(line)
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        paragraphs.append(" ".join(current))
        books[book] = _paragraphs(paragraphs)
    return books


def read_books(source_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Book name (``BOOKS``, in that order) -> plain text. See the module docstring for the layout.

    Raises:
      AssetNotInstalled: a raw file is missing or corrupt (the message names ``bash setup.sh``).
    """
    path = resolve_text_dir(source_dir)
    books = {**read_kjv(path / KJV_FILE), **read_austen(path)}
    for name, text in books.items():
        if not text:
            raise _corrupt(path, f"book {name!r} is empty")
    return {name: books[name] for name in BOOKS}


# ----------------------------------------------------------------------------- tfds builder


def _tokenizer_json(tokenizer: Any) -> str:
    return tokenizer if isinstance(tokenizer, str) else tokenizer.to_str()


def config_name(tokenizer: Any, block_len: int, bos_id: int | None = None) -> str:
    """``b{block_len}_t{sha256(tokenizer JSON)[:12]}[_bos{id}]``: one cache per tokenisation."""
    digest = hashlib.sha256(_tokenizer_json(tokenizer).encode("utf-8")).hexdigest()[:12]
    return f"b{block_len}_t{digest}" + ("" if bos_id is None else f"_bos{bos_id}")


def tokenize_book(tokenizer: Any, text: str, block_len: int, bos_id: int | None = None) -> np.ndarray:
    """One book's blocks: int32 [n, block_len] (see the module docstring)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if bos_id is not None:
        ids = [bos_id, *ids]
    n = len(ids) // block_len
    return np.asarray(ids[: n * block_len], dtype=np.int32).reshape(n, block_len)


class SppBooks(tfds.core.GeneratorBasedBuilder):
    """KJV Old/New Testament and Austen's six novels as token blocks, one split per book."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Debian bible-kjv and r-cran-janeaustenr texts."}
    code_path = epath.Path(__file__)  # see SppFashionMnist.code_path

    def __init__(
        self,
        *,
        tokenizer: Any,
        block_len: int,
        bos_id: int | None = None,
        source_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ):
        """``tokenizer``: a ``tokenizers.Tokenizer`` or its JSON (``to_str()``)."""
        if int(block_len) < 1:
            raise ConfigError(f"block_len must be >= 1, got {block_len}")
        from tokenizers import Tokenizer

        tok_json = _tokenizer_json(tokenizer)
        self.tokenizer = Tokenizer.from_str(tok_json) if isinstance(tokenizer, str) else tokenizer
        self.block_len, self.bos_id = int(block_len), None if bos_id is None else int(bos_id)
        self.source_dir = resolve_text_dir(source_dir)
        kwargs.pop("config", None)  # always derived from the arguments (also when unpickling)
        kwargs.setdefault("file_format", "array_record")
        config = tfds.core.BuilderConfig(
            name=config_name(tok_json, self.block_len, self.bos_id),
            version=self.VERSION,
            description=f"blocks of {self.block_len} tokens, bos_id={self.bos_id}",
        )
        super().__init__(config=config, **kwargs)
        self._original_state = dict(
            self._original_state,
            config=None,
            tokenizer=tok_json,
            block_len=self.block_len,
            bos_id=self.bos_id,
            source_dir=os.fspath(self.source_dir),
        )

    def _create_builder_config(self, builder_config: Any, version: Any) -> tfds.core.BuilderConfig:
        # Configs are made per tokenizer, never listed in BUILDER_CONFIGS: skip tfds' lookup, which
        # would log "Using custom data configuration" on every construction.
        return builder_config

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    TOKENS_KEY: tfds.features.Tensor(
                        shape=(self.block_len,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES
                    ),
                    BOOK_KEY: tfds.features.ClassLabel(names=list(BOOKS)),
                }
            ),
            disable_shuffling=True,  # block i of a split is the book's i-th block
            homepage="https://packages.debian.org/bookworm/bible-kjv",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # files are local
        books = read_books(self.source_dir)
        blocks = {}
        for name, text in books.items():
            blocks[name] = tokenize_book(self.tokenizer, text, self.block_len, self.bos_id)
            if len(blocks[name]) == 0:
                raise ConfigError(
                    f"book {name!r} is shorter than one block of {self.block_len} tokens; "
                    "use a smaller block_len"
                )
        return {name: self._generate_examples(name, b) for name, b in blocks.items()}

    def _generate_examples(self, book: str, blocks: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, block in enumerate(blocks):
            yield i, {TOKENS_KEY: block, BOOK_KEY: book}


def build_books(
    tokenizer: Any,
    block_len: int,
    data_dir: str | os.PathLike[str] | None = None,
    bos_id: int | None = None,
    source_dir: str | os.PathLike[str] | None = None,
) -> SppBooks:
    """Builds the token blocks into ``data_dir`` once (idempotent, safe under concurrency).

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (or its JSON string).
      block_len: tokens per block.
      data_dir: tfds data directory (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      bos_id: if given, prepended once to each book's token stream.
      source_dir: the text dir (default: ``resolve_text_dir()``).

    Returns:
      A prepared builder; read it with ``builder.as_data_source(split=...)``.
    """
    make = lambda: SppBooks(
        tokenizer=tokenizer, block_len=block_len, bos_id=bos_id, source_dir=source_dir, data_dir=data_dir
    )
    builder = make()
    if _is_prepared(builder):
        return builder
    lock = Path(builder.data_dir_root) / f".{builder.name}.{builder.builder_config.name}.lock"
    with _file_lock(lock):
        builder = make()  # another process may have finished while we waited: re-read its info
        if not _is_prepared(builder):
            builder.download_and_prepare(file_format="array_record")
    return builder


def books_source(
    tokenizer: Any,
    block_len: int,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    bos_id: int | None = None,
    source_dir: str | os.PathLike[str] | None = None,
) -> Sequence[dict[str, Any]]:
    """Random-access source of blocks (``tokens`` int32 [block_len], ``book`` int) for ``split``.

    ``split`` is a tfds split spec over ``BOOKS``: ``"kjv_old+sense+pride+mansfield+emma"``,
    ``"persuasion[:64]"``, ``"emma[50%:]"``. Builds on first use (see ``build_books``).
    """
    builder = build_books(tokenizer, block_len, data_dir=data_dir, bos_id=bos_id, source_dir=source_dir)
    return _as_data_source(builder, builder.name, split, lambda: builder.as_data_source(split=split))
