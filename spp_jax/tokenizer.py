"""Tokenizers for the Llama-style decoder: rebuilt from GGUF metadata, and stored next to a pruned model.

GGUF format (the `tokenizer.ggml.*` metadata keys of a llama.cpp model file):
  model        "gpt2" for byte-level BPE (the only kind read here; "llama" is SentencePiece)
  pre          the pre-tokenizer name llama.cpp picked at conversion ("smollm", "gpt2", "default", ...)
  tokens       the vocabulary, one string per id, in byte-level alphabet (a space is "Ġ", a newline "Ċ")
  token_type   per id: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
  merges       the BPE merge rules in priority order, each "left right" separated by one space
  bos_token_id / eos_token_id / padding_token_id / unknown_token_id   optional special ids

The `tokenizers` library rebuilds the same tokenizer: a BPE model over (tokens, merges), control and
user-defined tokens added as whole tokens (never split, control tokens skipped when decoding), the
pre-tokenizer named by `pre`, and a ByteLevel decoder. Nothing is added around an encoding (no BOS).

A pruned-model directory carries `tokenizer.json` (the `tokenizers` serialization) and
`special_tokens.json` ({"bos": id, "eos": id, "pad": id}, null where absent): `save_tokenizer`,
`load_tokenizer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from spp_jax.errors import CheckpointMismatch

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_FILE = "special_tokens.json"
SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id"}
# llama.cpp pre-tokenizer names this module rebuilds: (split single digits first?).
_PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "gpt-2": False, "default": False}
_CONTROL, _USER_DEFINED = 3, 4


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """The python value of metadata `key` of a `gguf.GGUFReader` (str, int, float, bool or list)."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tokenizer_from_gguf_metadata(reader: Any):
    """A `tokenizers.Tokenizer` equal to the byte-level BPE tokenizer stored in a GGUF file's metadata.

    `reader` is a `gguf.GGUFReader`. Raises `CheckpointMismatch` for a tokenizer kind not rebuilt here.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointMismatch(
            f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is rebuilt"
        )
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointMismatch(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = list(gguf_field(reader, "tokenizer.ggml.tokens", []))
    if not tokens:
        raise CheckpointMismatch("GGUF file has no tokenizer.ggml.tokens; it carries no tokenizer")
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges", [])]
    types = list(gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointMismatch("GGUF token list has duplicate entries; the tokenizer cannot be rebuilt")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _PRE_TOKENIZERS[pre]:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(t, special=ty == _CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    if added:
        tok.add_tokens(added)  # ids are kept: every added token is already in the vocabulary
    return tok


def special_ids_from_gguf_metadata(reader: Any) -> dict[str, int | None]:
    """{"bos", "eos", "pad"} token ids from GGUF metadata (None where the file names none)."""
    return {k: as_token_id(gguf_field(reader, f"tokenizer.ggml.{key}")) for k, key in SPECIAL_KEYS.items()}


def save_tokenizer(directory: str | os.PathLike, tok: Any, special_ids: dict[str, int | None]) -> None:
    """Write `tokenizer.json` and `special_tokens.json` into `directory` (created if needed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / TOKENIZER_FILE))
    clean = {k: as_token_id(special_ids.get(k)) for k in SPECIAL_KEYS}
    (d / SPECIAL_FILE).write_text(json.dumps(clean, indent=1) + "\n")


def load_tokenizer(directory: str | os.PathLike) -> tuple[Any, dict[str, int | None]]:
    """(tokenizer, special ids) written by `save_tokenizer`; `CheckpointMismatch` without tokenizer.json.

    A directory without `special_tokens.json` gives all-None special ids.
    """
    from tokenizers import Tokenizer

    d = Path(directory)
    path = d / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointMismatch(f"{d} has no {TOKENIZER_FILE}; save the tokenizer with save_tokenizer")
    tok = Tokenizer.from_file(str(path))
    special: dict[str, int | None] = dict.fromkeys(SPECIAL_KEYS)
    if (d / SPECIAL_FILE).is_file():
        stored = json.loads((d / SPECIAL_FILE).read_text())
        special.update({k: as_token_id(stored.get(k)) for k in SPECIAL_KEYS})
    return tok, special


def as_token_id(x: Any) -> int | None:
    """A token id as int (None stays None; of a list of ids, the first)."""
    if isinstance(x, list | tuple):  # HF configs may list several eos ids: the first is the main one
        x = x[0] if x else None
    return None if x is None else int(x)


__all__ = [
    "as_token_id",
    "gguf_field",
    "load_tokenizer",
    "save_tokenizer",
    "special_ids_from_gguf_metadata",
    "tokenizer_from_gguf_metadata",
]
