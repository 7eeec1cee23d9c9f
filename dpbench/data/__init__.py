"""Dataset loaders, registered by name. Each returns a :class:`DatasetBundle` of in-memory tensors."""

from __future__ import annotations

from typing import Any

from dpbench.data.base import DatasetBundle
from dpbench.registry import Registry

DATASETS: Registry[Any] = Registry("dataset")

from dpbench.data import mnist, synthetic  # noqa: E402,F401  (registers the built-ins)
from dpbench.data import cifar10, imdb  # noqa: E402,F401


def dataset_variant(name: str, data_dir: str | None = None) -> str:
    """What ``load_dataset`` would record as ``dataset_variant``, without loading the data."""
    variant = DATASETS.entry(name).meta.get("variant", name)
    return variant(data_dir) if callable(variant) else variant


def load_dataset(name: str, data_dir: str | None = None) -> DatasetBundle:
    """Load dataset ``name``; ``data_dir`` (or $DPBENCH_DATA) points at an offline copy."""
    return DATASETS.get(name)(data_dir)


__all__ = ["DATASETS", "DatasetBundle", "dataset_variant", "load_dataset"]
