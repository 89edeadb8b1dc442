"""Fashion-MNIST as an offline tfds builder (array_record, no TensorFlow needed).

The raw IDX files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``). They are read by a tiny IDX parser and written once
into ``data_dir`` by a ``tfds.core.GeneratorBasedBuilder`` with ``Tensor``/``ClassLabel``
features, then read back with random access via ``builder.as_data_source(split=...)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from spp_jax.errors import AssetNotInstalled

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
SOURCE_DIR_ENV = "SPP_FASHION_MNIST_DIR"
CLASS_NAMES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# split name -> IDX file prefix
SPLIT_FILES = {"train": "train", "test": "t10k"}
_INSTALL_HINT = "run `apt-get install -y dataset-fashion-mnist` (or set SPP_FASHION_MNIST_DIR)"
_REPLACE_HINT = "replace it (`apt-get install --reinstall -y dataset-fashion-mnist`)"
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a gzipped IDX file (``[0, 0, dtype, ndim]`` magic, big-endian uint32 dims).

    Raises:
      AssetNotInstalled: the file is missing, not gzip, truncated or has a bad magic number.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise AssetNotInstalled(f"IDX file {path} not found; {_INSTALL_HINT}") from None
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AssetNotInstalled(f"corrupt IDX file {path} ({reason}); {_REPLACE_HINT}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise AssetNotInstalled(f"corrupt IDX file {path} (bad magic number {raw[:4]!r}); {_REPLACE_HINT}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise AssetNotInstalled(f"corrupt IDX file {path} (truncated header); {_REPLACE_HINT}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise AssetNotInstalled(
            f"corrupt IDX file {path} (payload {len(raw) - header} bytes, dims {dims} "
            f"need {expected}); {_REPLACE_HINT}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Writes a uint8 array as a gzipped IDX file (used by tests and synthetic data)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def resolve_source_dir(source_dir: str | os.PathLike[str] | None = None) -> Path:
    """Source directory: the argument, else ``$SPP_FASHION_MNIST_DIR``, else the Debian path."""
    return Path(source_dir or os.environ.get(SOURCE_DIR_ENV) or DEFAULT_SOURCE_DIR)


def _idx_paths(source_dir: Path, split: str) -> tuple[Path, Path]:
    prefix = SPLIT_FILES[split]
    return (
        source_dir / f"{prefix}-images-idx3-ubyte.gz",
        source_dir / f"{prefix}-labels-idx1-ubyte.gz",
    )


def check_source_dir(source_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns the resolved source dir, or raises AssetNotInstalled if an IDX file is missing."""
    path = resolve_source_dir(source_dir)
    for split in SPLIT_FILES:
        for f in _idx_paths(path, split):
            if not f.is_file():
                raise AssetNotInstalled(
                    f"Fashion-MNIST not found in {path} (missing {f.name}); {_INSTALL_HINT}"
                )
    return path


def load_split(source_dir: str | os.PathLike[str] | None, split: str) -> tuple[np.ndarray, ...]:
    """Returns ``(images [n, 28, 28] uint8, labels [n] int64)`` for ``split`` from IDX files."""
    path = check_source_dir(source_dir)
    img_path, lbl_path = _idx_paths(path, split)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise AssetNotInstalled(
            f"corrupt IDX file {img_path} (want uint8 [n, 28, 28], got {images.dtype} "
            f"{list(images.shape)}); {_REPLACE_HINT}"
        )
    if labels.ndim != 1 or len(labels) != len(images) or labels.max(initial=0) >= len(CLASS_NAMES):
        raise AssetNotInstalled(
            f"corrupt IDX file {lbl_path} ({len(labels)} labels for {len(images)} images, "
            f"or a label >= {len(CLASS_NAMES)}); {_REPLACE_HINT}"
        )
    return images, labels.astype(np.int64)


class SppFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST built offline from local IDX files into array_record shards."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Built from Debian's IDX files."}
    # tfds infers this via `importlib_resources`, which it does not declare as a dependency on
    # Python >= 3.9 (tensorflow/datasets#11212); the file path is what it would infer.
    code_path = epath.Path(__file__)

    def __init__(self, *, source_dir: str | os.PathLike[str] | None = None, **kwargs: Any):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self.source_dir = resolve_source_dir(source_dir)
        # DatasetBuilder pickles by re-calling __init__ with _original_state.
        self._original_state = dict(self._original_state, source_dir=os.fspath(self.source_dir))

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # BYTES stores the raw 784 bytes instead of an int64 list of 784 values,
                    # which tfds serialises element by element (the build's main cost).
                    "image": tfds.features.Tensor(
                        shape=(28, 28, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
                    ),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the IDX order: example i of a split is IDX record i
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # files are local
        # Parse every file before writing anything, so a corrupt file fails fast.
        arrays = {split: load_split(self.source_dir, split) for split in SPLIT_FILES}
        return {split: self._generate_examples(*arrays[split]) for split in SPLIT_FILES}

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(len(images)):
            yield i, {"image": images[i][:, :, None], "label": int(labels[i])}


def _is_prepared(builder: SppFashionMnist) -> bool:
    # `is_prepared` logs a warning for a missing folder: check that first.
    return builder.data_path.exists() and builder.is_prepared()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (``flock``) across processes and threads on this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(
    data_dir: str | os.PathLike[str] | None = None,
    source_dir: str | os.PathLike[str] | None = None,
) -> SppFashionMnist:
    """Builds Fashion-MNIST into ``data_dir`` once (idempotent, safe under concurrency).

    Args:
      data_dir: tfds data directory (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      source_dir: directory with the IDX files (default: ``$SPP_FASHION_MNIST_DIR`` or the
        Debian path).

    Returns:
      A prepared builder; read it with ``builder.as_data_source(split=...)``.
    """
    builder = SppFashionMnist(data_dir=data_dir, source_dir=source_dir)
    if _is_prepared(builder):
        return builder
    check_source_dir(builder.source_dir)
    lock = Path(builder.data_dir_root) / f".{builder.name}.lock"
    with _file_lock(lock):
        # Another process may have finished while we waited: re-create to re-read its info.
        builder = SppFashionMnist(data_dir=data_dir, source_dir=source_dir)
        if not _is_prepared(builder):
            builder.download_and_prepare(file_format="array_record")
    return builder
