"""Input pipeline: offline Fashion-MNIST tfds builder, tfds sources and grain loaders."""

from spp_jax.data.fashion_mnist import CLASS_NAMES, SppFashionMnist, build, read_idx, write_idx
from spp_jax.data.pipeline import (
    IMAGE_KEY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LABEL_KEY,
    get_source,
    iterate_eval,
    loader_state,
    make_loader,
    num_classes,
    restore_loader_state,
)

__all__ = [
    "CLASS_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_KEY",
    "LABEL_KEY",
    "SppFashionMnist",
    "build",
    "get_source",
    "iterate_eval",
    "loader_state",
    "make_loader",
    "num_classes",
    "read_idx",
    "restore_loader_state",
    "write_idx",
]
