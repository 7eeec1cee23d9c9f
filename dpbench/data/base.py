"""The in-memory form every loader returns, and where offline copies and caches live."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class DatasetBundle:
    """Train and test tensors (already normalised) plus what the harness needs to know about them."""

    name: str
    variant: str  # what was really used, e.g. "mnist" or "cifar10-jpeg-q75"
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def train_size(self) -> int:
        return len(self.train_y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def cache_dir() -> Path:
    """``$DPBENCH_CACHE``, default ``~/.cache/dpbench``: decoded data and features, never in the repo."""
    return Path(os.environ.get("DPBENCH_CACHE") or Path.home() / ".cache" / "dpbench")


def offline_roots(data_dir: str | None) -> list[Path]:
    """Folders laid out like the offline data copy: ``--data-dir`` first, then ``$DPBENCH_DATA``."""
    roots = [data_dir, os.environ.get("DPBENCH_DATA")]
    return [Path(r).expanduser() for r in roots if r]
