"""Deterministic, resumable grain loaders of fixed-shape records: token blocks (language models) and
tokenised texts with their attention masks and labels (text classification).

Pipeline (grain ``MapDataset`` API, one process's view)::

    source -> seed -> shuffle -> repeat -> int32 tokens -> this process's rows of every global batch
    -> to_iter_dataset [-> mp_prefetch] -> batch

Same conventions as ``spp_jax.data.pipeline`` (``make_loader``/``iterate_eval``): the global
batches are the same for any process count, and each element is a pure function of (seed, position),
so ``loader_state``/``restore_loader_state`` resume exactly. Sources are the random-access block
sources of ``spp_jax.data.books.books_source`` (or any sequence of dicts with an int [block_len]
``tokens`` entry).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import numpy as np

from spp_jax.data.books import TOKENS_KEY
from spp_jax.data.pipeline import (
    Batch,
    Source,
    _allow_unparsed_absl_flags,
    _process,
    check_batches,
    loader_process,
    process_rows,
)
from spp_jax.errors import ConfigError


def _tokens(example: Mapping[str, Any], *, key: str = TOKENS_KEY) -> dict[str, np.ndarray]:
    tokens = np.asarray(example[key])
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(f"{key!r} is {tokens.dtype} {list(tokens.shape)}; want a 1-d integer block")
    return {"tokens": tokens.astype(np.int32, copy=False)}


def int_fields(example: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The int32 arrays `example[k]` for k in `keys` (e.g. input_ids, attention_mask, label)."""
    return {k: np.asarray(example[k]).astype(np.int32, copy=False) for k in keys}


Convert = Callable[[Mapping[str, Any]], dict[str, np.ndarray]]


def make_token_loader(
    source: Source,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    *,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    tokens_key: str = TOKENS_KEY,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Returns a deterministic, checkpointable grain iterator of ``{"tokens": int32 [b, L]}``.

    The record loader (`make_record_loader`) with the blocks' ``tokens_key`` as the record.
    """
    return make_record_loader(
        source, global_batch_size, seed, num_epochs, convert=functools.partial(_tokens, key=tokens_key),
        shuffle=shuffle, process_index=process_index, process_count=process_count,
        drop_remainder=drop_remainder, worker_count=worker_count, read_options=read_options,
    )  # fmt: skip


def make_record_loader(
    source: Source,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    *,
    convert: Convert,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Returns a deterministic, checkpointable grain iterator of batched ``convert(example)`` dicts.

    Process ``i`` of ``n`` reads rows ``[i*b, (i+1)*b)`` of every global batch (``b =
    global_batch_size // n``; ``spp_jax.data.pipeline.process_rows``), so the global batches are the
    same for any ``n``.
    ``shuffle`` reshuffles every epoch from ``seed``; ``num_epochs=None`` repeats forever.
    ``worker_count > 0`` reads in that many processes (same batches). Save/restore with
    ``spp_jax.data.loader_state``/``restore_loader_state``.
    """
    index, count = loader_process(global_batch_size, seed, num_epochs, process_index, process_count)
    batch_size = global_batch_size // count
    check_batches(len(source), num_epochs, global_batch_size, count, drop_remainder, "records")
    ds = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = process_rows(ds.repeat(num_epochs).map(convert), index, count, batch_size, drop_remainder)
    it_ds = ds.to_iter_dataset(read_options)
    if worker_count > 0:
        _allow_unparsed_absl_flags()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds.batch(batch_size, drop_remainder=drop_remainder))


def iterate_token_eval(
    source: Source,
    batch_size: int,
    limit: int | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    tokens_key: str = TOKENS_KEY,
    read_options: grain.ReadOptions | None = None,
) -> Iterator[Batch]:
    """Yields every block of this process's shard once, in order, in padded batches: `iterate_record_eval`
    with the blocks' ``tokens_key`` as the record."""
    return iterate_record_eval(
        source, batch_size, limit, convert=functools.partial(_tokens, key=tokens_key),
        process_index=process_index, process_count=process_count, read_options=read_options,
    )  # fmt: skip


def iterate_record_eval(
    source: Source,
    batch_size: int,
    limit: int | None = None,
    *,
    convert: Convert,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> Iterator[Batch]:
    """Yields every record of this process's shard once, in order, in padded batches.

    Reads the first ``limit`` blocks (all if None); process ``i`` of ``n`` takes ``[i::n]`` of
    them. All processes yield the same number of batches of ``batch_size``, padded at the end
    with real records. Each batch: the ``convert``ed fields and ``mask`` float32 [b] (1 real,
    0 padding), so mask-weighted sums over processes give exact split totals (e.g. perplexity).
    """
    index, count = _process(process_index, process_count)
    total = len(source) if limit is None else min(int(limit), len(source))
    if batch_size < 1 or total < 1:
        raise ConfigError(
            f"need batch_size >= 1 and at least one block, got batch_size {batch_size}, "
            f"{total} blocks (split of {len(source)}, limit {limit})"
        )
    per_process = math.ceil(total / count)
    num_batches = max(1, math.ceil(per_process / batch_size))

    def load(j: int) -> dict[str, np.ndarray]:
        k = index + j * count
        mask = np.float32(k < total)  # padding: a real block (same shape), mask 0
        return {**convert(source[k % total]), "mask": mask}

    ds = grain.MapDataset.range(num_batches * batch_size).map(load)
    return iter(ds.to_iter_dataset(read_options).batch(batch_size))
