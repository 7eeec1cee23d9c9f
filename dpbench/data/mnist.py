"""MNIST and Fashion-MNIST through torchvision's dataset classes.

Online users get torchvision's download. Offline, a folder laid out like the shared data copy
(``<root>/mnist/*-ubyte.gz``, ``<root>/fmnist/*-ubyte.gz``) is decompressed once into the cache,
in the raw layout torchvision's classes read, keyed by a hash of the source files.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
from pathlib import Path

import torch
import torchvision
from torchvision.transforms import v2 as T

from dpbench.data import DATASETS
from dpbench.data.base import DatasetBundle, offline_roots, validation_split, validation_variant
from dpbench.storage import atomic_write, cache_dir, cache_remedy, reading_data_file, source_remedy
from dpbench.errors import BadInput

#: Training records held out as the validation split of ``mnist_val`` / ``fmnist_val``.
VALIDATION_HOLDOUT = 10_000
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _prepare_offline(cls: type, sources: list[Path]) -> Path:
    """Decompress the IDX files into ``<cache>/<key>/<Class>/raw/`` and return the root for ``cls``."""
    root = cache_dir() / "idx" / _hash_files(sources)
    raw = root / cls.__name__ / "raw"
    if not all((raw / name).exists() for name in IDX_FILES):
        fresh = not root.exists()
        raw.mkdir(parents=True, exist_ok=True)
        for src, name in zip(sources, IDX_FILES):
            # a name of its own for every writer: sweep jobs that start together on a fresh cache
            # decompress the same files at once, and a shared temporary name lets one move the
            # other's half-written file into place
            try:
                with reading_data_file(src, source_remedy(src)), gzip.open(src, "rb") as fin:
                    atomic_write(raw / name, lambda fout: shutil.copyfileobj(fin, fout))
            except BadInput:
                if fresh:  # an entry keyed on a damaged source can never be completed
                    shutil.rmtree(root, ignore_errors=True)
                raise
    return root


def check_idx_size(path: Path) -> None:
    """A ValueError unless the IDX file's size is what its header's dimensions say (a cut file is shorter)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
        if len(head) < 4 or head[:2] != b"\x00\x00":
            raise ValueError("not an IDX file (bad magic number)")
        dims = [int.from_bytes(fh.read(4), "big") for _ in range(head[3])]
    expected = 4 + 4 * len(dims) + math.prod(dims)
    if path.stat().st_size != expected:
        raise ValueError(f"{path.stat().st_size} bytes where its header {dims} needs {expected}")


def _load(name: str, cls: type, subdir: str, mean: float, std: float, data_dir: str | None) -> DatasetBundle:
    tried: list[str] = []
    root: Path | None = None
    for base in offline_roots(data_dir):
        sources = [base / subdir / f"{n}.gz" for n in IDX_FILES]
        tried.append(str(base / subdir))
        if all(s.exists() for s in sources):
            root = _prepare_offline(cls, sources)
            break
    if root is None:
        root = cache_dir() / "torchvision"
        tried.append(f"torchvision download into {root}")
        problem = "DPBENCH_OFFLINE is set"
        try:
            if not os.environ.get("DPBENCH_OFFLINE"):
                cls(root=root, train=True, download=True)
                cls(root=root, train=False, download=True)
                problem = ""
        except Exception as exc:  # no network: say where we looked and how to fix it
            problem = f"download failed: {type(exc).__name__}"
        if problem:
            raise BadInput(
                f"dataset {name!r} not found; tried {'; '.join(tried)} ({problem}). "
                f"Pass --data-dir (or set DPBENCH_DATA) to a folder holding {subdir}/{IDX_FILES[0]}.gz etc."
            )
    normalise = T.Normalize((mean,), (std,))

    def tensors(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # the IDX files torchvision reads are dpbench's decompressed cache entry, or torchvision's download
        raw = Path(root) / cls.__name__ / "raw"
        for name in IDX_FILES[:2] if train else IDX_FILES[2:]:
            with reading_data_file(raw / name, cache_remedy(raw / name)):
                check_idx_size(raw / name)
        with reading_data_file(raw, cache_remedy(raw)):
            ds = cls(root=root, train=train, download=False)
            if len(ds.data) != len(ds.targets):
                raise ValueError(f"{len(ds.data)} images but {len(ds.targets)} labels")
        x = normalise(ds.data.unsqueeze(1).float() / 255.0)
        return x.contiguous(), ds.targets.long()

    train_x, train_y = tensors(True)
    test_x, test_y = tensors(False)
    return DatasetBundle(name, name, train_x, train_y, test_x, test_y, num_classes=10,
                         normalisation=((mean,), (std,)))


@DATASETS.register("mnist", train_size=60000, num_classes=10, summary="MNIST digits, 28x28 grey, 60k/10k (LeCun et al.)")
def load_mnist(data_dir: str | None = None) -> DatasetBundle:
    return _load("mnist", torchvision.datasets.MNIST, "mnist", 0.1307, 0.3081, data_dir)


@DATASETS.register("fmnist", train_size=60000, num_classes=10, summary="Fashion-MNIST, 28x28 grey, 60k/10k (Xiao et al. 2017)")
def load_fmnist(data_dir: str | None = None) -> DatasetBundle:
    return _load("fmnist", torchvision.datasets.FashionMNIST, "fmnist", 0.2860, 0.3530, data_dir)


# Validation splits for tuning: the test split stays untouched until the final runs.
@DATASETS.register("mnist_val", train_size=50000, num_classes=10, base="mnist",
                   variant=validation_variant("mnist", VALIDATION_HOLDOUT),
                   summary="MNIST for tuning: train on the first 50k training images, evaluate on the last 10k")
def load_mnist_val(data_dir: str | None = None) -> DatasetBundle:
    return validation_split(load_mnist(data_dir), VALIDATION_HOLDOUT)


@DATASETS.register("fmnist_val", train_size=50000, num_classes=10, base="fmnist",
                   variant=validation_variant("fmnist", VALIDATION_HOLDOUT),
                   summary="Fashion-MNIST for tuning: train on the first 50k training images, evaluate on the last 10k")
def load_fmnist_val(data_dir: str | None = None) -> DatasetBundle:
    return validation_split(load_fmnist(data_dir), VALIDATION_HOLDOUT)

