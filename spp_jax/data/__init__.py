"""Input pipeline: offline Fashion-MNIST and book-text tfds builders, tfds sources and grain loaders."""

from spp_jax.data.books import BOOKS, SppBooks, books_source, build_books, read_books
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
from spp_jax.data.text import iterate_token_eval, make_token_loader

__all__ = [
    "BOOKS",
    "CLASS_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_KEY",
    "LABEL_KEY",
    "SppBooks",
    "SppFashionMnist",
    "books_source",
    "build",
    "build_books",
    "get_source",
    "iterate_eval",
    "iterate_token_eval",
    "loader_state",
    "make_loader",
    "make_token_loader",
    "num_classes",
    "read_books",
    "read_idx",
    "restore_loader_state",
    "write_idx",
]
