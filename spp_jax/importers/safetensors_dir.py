"""Hugging Face-style `.safetensors` weights: one `model.safetensors` or shards listed by
`model.safetensors.index.json` ("weight_map"), read lazily without torch.

Safetensors format: 8 bytes little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}} (offsets relative to the end of the header), then the raw little-endian
data. It is read here directly (memory-mapped) so that BF16 tensors need no torch: a bfloat16 is the
upper 16 bits of a float32, so `uint16 << 16` viewed as float32 is exact.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from spp_jax.errors import CheckpointMismatch

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


class SafetensorsFile:
    """Lazy, memory-mapped reader of one `.safetensors` file (F32, F16, BF16, F64 -> float32)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header, self.start = header, 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = info["dtype"]
        if dtype not in _DTYPES:
            raise CheckpointMismatch(
                f"{self.path.name}: tensor {name!r} has dtype {dtype}; need F32/F16/BF16"
            )
        begin, end = info["data_offsets"]
        count = (end - begin) // np.dtype(_DTYPES[dtype]).itemsize
        raw = np.memmap(self.path, dtype=_DTYPES[dtype], mode="r", offset=self.start + begin, shape=(count,))
        if dtype == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.asarray(raw, dtype=np.float32)
        return arr.reshape(info["shape"])


def open_weights(d: Path) -> dict[str, SafetensorsFile]:
    """{tensor name: the file holding it}, from `model.safetensors` or its shard index."""
    index, single = d / "model.safetensors.index.json", d / "model.safetensors"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            if not (d / shard).is_file():
                raise CheckpointMismatch(f"{d}: shard {shard} listed in {index.name} is missing")
            files[shard] = SafetensorsFile(d / shard)
        return {name: files[shard] for name, shard in weight_map.items()}
    if single.is_file():
        f = SafetensorsFile(single)
        return dict.fromkeys(f.keys(), f)
    raise CheckpointMismatch(
        f"{d} has no model.safetensors (nor model.safetensors.index.json); save with safe_serialization=True"
    )


__all__ = ["SafetensorsFile", "open_weights"]
