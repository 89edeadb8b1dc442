"""Book texts -> token-block tfds builder -> grain token loaders (fake texts; one real-asset test)."""

from __future__ import annotations

import gzip
import pickle
import re
import time
import zlib

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from spp_jax.data import (
    BOOKS,
    books_source,
    build_books,
    iterate_token_eval,
    loader_state,
    make_token_loader,
    read_books,
    restore_loader_state,
)
from spp_jax.data.books import AUSTEN_DB, AUSTEN_OBJECTS, KJV_FILE, config_name, resolve_text_dir
from spp_jax.errors import AssetNotInstalled, CheckpointMismatch, ConfigError

BLOCK = 8
KJV_LINES = [
    "Ge1:1 In the beginning God created the heaven and the earth.",
    "Ge1:2 And the earth was without form, and void.",
    "Ge2:1 Thus the heavens and the earth were finished, and all the host of them.",
    "Mal4:6 And he shall turn the heart of the fathers to the children.",
    "Mat1:1 The book of the generation of Jesus Christ, the son of David.",
    "Mat1:2 Abraham begat Isaac; and Isaac begat Jacob.",
    "Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.",
]


def _novel(title: str) -> list[str]:
    return [
        title.upper(),
        "",
        "By Jane Austen",
        "",
        "",
        "CHAPTER 1",
        "",
        f"It is a truth of {title} universally acknowledged, that a single man in",
        "possession of a good fortune,   must be in want of a wife.",
        "",
        f"However little known the feelings of {title} may be on his first entering a",
        "neighbourhood, this truth is so well fixed in the minds of the families.",
        "",
    ]


def write_lazyload(prefix, objects: dict[str, list[str]]) -> None:
    """Writes character vectors as an R lazy-load database (``prefix.rdb``/``prefix.rdx``)."""
    import rdata
    from rdata.conversion import convert_python_to_r_data

    def serialize(obj) -> bytes:
        return rdata.unparser.unparse_data(convert_python_to_r_data(obj))

    rdb, variables = b"", {}
    for name, lines in objects.items():
        raw = serialize(np.array(lines))
        blob = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        variables[name] = np.array([len(rdb), len(blob)], dtype=np.int32)
        rdb += blob
    index = {"variables": variables, "references": {}, "compressed": np.array([True])}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_name(prefix.name + ".rdb").write_bytes(rdb)
    prefix.with_name(prefix.name + ".rdx").write_bytes(gzip.compress(serialize(index)))


def write_fake_texts(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / KJV_FILE).write_text("\n".join(KJV_LINES) + "\n")
    write_lazyload(root / AUSTEN_DB, {obj: _novel(book) for book, obj in AUSTEN_OBJECTS.items()})
    return root


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A tiny byte-level BPE trained on the fake texts (no special tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(KJV_LINES + _novel("emma"), trainer)
    return tok


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("books")
    return {
        "src": write_fake_texts(root / "text"),
        "data": root / "tfds",
        "tok": train_tokenizer(300),
    }


def _source(env, split, block_len=BLOCK, **kw):
    return books_source(env["tok"], block_len, split, data_dir=env["data"], source_dir=env["src"], **kw)


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------- texts


def test_read_books_fake(env):
    books = read_books(env["src"])
    assert tuple(books) == BOOKS
    assert books["kjv_old"].startswith("In the beginning God created")
    assert books["kjv_old"].endswith("to the children.")  # Malachi ends the Old Testament
    assert books["kjv_new"].startswith("The book of the generation")
    assert not re.search(r"\d+:\d+|Ge1|Mat1", books["kjv_old"] + books["kjv_new"])
    assert books["kjv_old"].count("\n\n") == 2  # one paragraph per chapter: Ge1, Ge2, Mal4
    # hard-wrapped lines joined, whitespace collapsed, paragraphs separated by one blank line
    assert "single man in possession of a good fortune, must be" in books["emma"]
    assert books["emma"].startswith("EMMA\n\nBy Jane Austen\n\nCHAPTER 1\n\nIt is a truth of emma")


def test_text_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPP_JAX_TEXT_DIR", str(tmp_path / "t"))
    assert resolve_text_dir() == tmp_path / "t"
    monkeypatch.delenv("SPP_JAX_TEXT_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert resolve_text_dir() == tmp_path / "c" / "spp_jax" / "books"


def test_missing_or_corrupt_texts(env, tmp_path):
    with pytest.raises(AssetNotInstalled, match=r"bash setup\.sh") as e:
        read_books(tmp_path / "nowhere")
    assert "\n" not in str(e.value) and "nowhere" in str(e.value)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / KJV_FILE).write_text("\n".join(KJV_LINES))
    with pytest.raises(AssetNotInstalled, match=r"Rdata.rd. not found.*bash setup.sh"):
        read_books(tmp_path / "a")
    (tmp_path / "a" / KJV_FILE).write_text("Genesis one\n")
    with pytest.raises(AssetNotInstalled, match="corrupt"):
        read_books(tmp_path / "a")
    write_fake_texts(tmp_path / "b")
    (tmp_path / "b" / (AUSTEN_DB + ".rdb")).write_bytes(b"\0\0\0\x09garbage" * 50)
    with pytest.raises(AssetNotInstalled, match="corrupt") as e:
        read_books(tmp_path / "b")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- builder


@pytest.mark.parametrize("bos_id", [None, 7])
def test_blocks_are_the_tokenised_book(env, bos_id):
    books = read_books(env["src"])
    builder = build_books(env["tok"], BLOCK, data_dir=env["data"], bos_id=bos_id, source_dir=env["src"])
    assert set(builder.info.splits) == set(BOOKS)
    for label, book in enumerate(BOOKS):
        ids = ([] if bos_id is None else [bos_id]) + _ids(env["tok"], books[book])
        src = _source(env, book, bos_id=bos_id)
        n = len(ids) // BLOCK
        assert len(src) == n > 0
        blocks = [src[i] for i in range(n)]
        assert all(b["tokens"].shape == (BLOCK,) and b["tokens"].dtype == np.int32 for b in blocks)
        assert np.concatenate([b["tokens"] for b in blocks]).tolist() == ids[: n * BLOCK]
        assert {int(b["book"]) for b in blocks} == {label}  # splits hold one book each


def test_config_names_separate_caches(env):
    tok2 = train_tokenizer(280)
    names = {
        config_name(env["tok"], BLOCK),
        config_name(tok2, BLOCK),
        config_name(env["tok"], 16),
        config_name(env["tok"], BLOCK, bos_id=1),
    }
    assert len(names) == 4
    # the JSON round-trips to the same name (so a reloaded tokenizer reuses the cache)
    assert config_name(Tokenizer.from_str(env["tok"].to_str()), BLOCK) == config_name(env["tok"], BLOCK)
    a = build_books(env["tok"], BLOCK, data_dir=env["data"], source_dir=env["src"])
    b = build_books(tok2, BLOCK, data_dir=env["data"], source_dir=env["src"])
    assert a.data_path != b.data_path and a.builder_config.name != b.builder_config.name
    assert len(_source(env, "emma")) != len(
        books_source(tok2, BLOCK, "emma", env["data"], source_dir=env["src"])
    )
    c = pickle.loads(pickle.dumps(a))
    assert c.builder_config.name == a.builder_config.name and c.block_len == BLOCK


def test_prepared_cache_needs_no_texts(env, tmp_path):
    build_books(env["tok"], BLOCK, data_dir=env["data"], source_dir=env["src"])
    t0 = time.perf_counter()
    src = books_source(env["tok"], BLOCK, "sense", data_dir=env["data"], source_dir=tmp_path / "gone")
    assert len(src) > 0 and time.perf_counter() - t0 < 5


def test_split_union_and_slicing(env):
    parts = ["kjv_old", "sense", "pride", "mansfield", "emma"]
    union = _source(env, "+".join(parts))
    singles = [_source(env, p) for p in parts]
    assert len(union) == sum(len(s) for s in singles)
    expect = [s[i]["tokens"].tolist() for s in singles for i in range(len(s))]
    assert [union[i]["tokens"].tolist() for i in range(len(union))] == expect
    head = _source(env, "persuasion[:2]")
    full = _source(env, "persuasion")
    assert len(head) == 2 and head[1]["tokens"].tolist() == full[1]["tokens"].tolist()


def test_bad_split_and_block_len(env):
    with pytest.raises(ConfigError, match="bad split 'genesis'") as e:
        _source(env, "genesis")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="shorter than one block"):
        build_books(env["tok"], 10_000, data_dir=env["data"], source_dir=env["src"])
    with pytest.raises(ConfigError, match="block_len"):
        build_books(env["tok"], 0, data_dir=env["data"], source_dir=env["src"])


# ----------------------------------------------------------------------------- loaders


def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def test_token_loader_deterministic_and_resumable(env):
    src = _source(env, "kjv_old+kjv_new+emma+pride")
    kw = dict(global_batch_size=4, seed=3)
    first = _take(make_token_loader(src, **kw), 6)
    assert all(b.shape == (4, BLOCK) and b.dtype == np.int32 for b in first)
    assert all((x == y).all() for x, y in zip(first, _take(make_token_loader(src, **kw), 6), strict=True))
    other = _take(make_token_loader(src, global_batch_size=4, seed=4), 6)
    assert any((x != y).any() for x, y in zip(first, other, strict=True))
    it = make_token_loader(src, **kw)
    _take(it, 2)
    state = loader_state(it)
    fresh = make_token_loader(src, **kw)
    restore_loader_state(fresh, state)
    assert all((x == y).all() for x, y in zip(first[2:], _take(fresh, 4), strict=True))
    with pytest.raises(CheckpointMismatch):
        restore_loader_state(fresh, {"nope": 1})


def test_token_loader_epoch_and_process_shards(env):
    src = _source(env, "kjv_old+emma")
    n = len(src)
    epoch = make_token_loader(src, 3, seed=0, num_epochs=1, drop_remainder=False)
    rows = np.concatenate([b["tokens"] for b in epoch])
    all_rows = sorted(src[i]["tokens"].tolist() for i in range(n))
    assert sorted(rows.tolist()) == all_rows  # one epoch = every block once
    shards = [
        np.concatenate(
            [b["tokens"] for b in make_token_loader(src, 2, 0, 1, process_index=p, process_count=2)]
        ).tolist()
        for p in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == n // 2
    assert sorted(shards[0] + shards[1]) == sorted(src[i]["tokens"].tolist() for i in range(n // 2 * 2))
    with pytest.raises(ConfigError, match="multiple of process_count"):
        make_token_loader(src, 3, 0, process_index=0, process_count=2)
    with pytest.raises(ConfigError, match="no batch"):
        make_token_loader(src, 4 * n, 0, num_epochs=1)


@pytest.mark.parametrize("limit", [None, 5])
def test_token_eval_covers_each_block_once(env, limit):
    src = _source(env, "kjv_new+persuasion")
    total = len(src) if limit is None else limit
    batches = list(iterate_token_eval(src, 4, limit))
    assert all(b["tokens"].shape == (4, BLOCK) and b["mask"].dtype == np.float32 for b in batches)
    assert len(batches) == -(-total // 4)
    mask = np.concatenate([b["mask"] for b in batches])
    rows = np.concatenate([b["tokens"] for b in batches])
    assert mask.sum() == total and (mask[:total] == 1).all() and (mask[total:] == 0).all()
    assert rows[:total].tolist() == [src[i]["tokens"].tolist() for i in range(total)]
    # two processes: disjoint, equal batch counts, together every block once
    per = [list(iterate_token_eval(src, 4, limit, process_index=p, process_count=2)) for p in range(2)]
    assert len(per[0]) == len(per[1])
    seen = [r.tolist() for p in per for b in p for r, m in zip(b["tokens"], b["mask"], strict=True) if m == 1]
    assert sorted(seen) == sorted(src[i]["tokens"].tolist() for i in range(total))


# ----------------------------------------------------------------------------- real asset


@pytest.mark.asset
@pytest.mark.skipif(
    not (resolve_text_dir() / KJV_FILE).is_file(),
    reason=f"book texts not in {resolve_text_dir()}: bash setup.sh",
)
def test_real_books():
    books = read_books()
    words = {name: len(text.split()) for name, text in books.items()}
    assert all(w > 50_000 for w in words.values()), words
    assert 780_000 <= words["kjv_old"] + words["kjv_new"] <= 830_000, words  # measured 789,634
    assert 700_000 <= sum(words[b] for b in AUSTEN_OBJECTS) <= 740_000, words
    assert words["kjv_old"] > 3 * words["kjv_new"]
    kjv = books["kjv_old"] + books["kjv_new"]
    assert not re.search(r"\d+:\d+", kjv) and not re.search(r"\b(Ge|Mat|Rev)\d", kjv)
    assert books["kjv_old"].startswith("In the beginning God created the heaven and the earth.")
    assert books["kjv_new"].startswith("The book of the generation of Jesus Christ")
    assert books["kjv_new"].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert "Emma Woodhouse, handsome, clever, and rich" in books["emma"][:200]
    assert "It is a truth universally acknowledged" in books["pride"][:200]
