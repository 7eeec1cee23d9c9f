"""The in-memory form every loader returns, and where offline copies and caches live."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

#: ``(batch, generator) -> batch``: a random, per-row transform of training inputs (augmentation).
TrainTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


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
    # Optional training-time augmentation, applied by the engine to each physical batch. With
    # ``augmentations`` = K > 1 every sampled example is augmented K times and its K gradients are
    # averaged before clipping, so each example still contributes one per-sample gradient (De et al.
    # 2022, "augmentation multiplicity"): the privacy analysis is unchanged, the compute is K times.
    train_transform: TrainTransform | None = None
    augmentations: int = 1
    # (per-channel mean, per-channel std) the loader applied to pixels in [0, 1], when it did; lets
    # feature extractors that expect another input convention undo it
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def train_size(self) -> int:
        return len(self.train_y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def offline_roots(data_dir: str | None) -> list[Path]:
    """Folders laid out like the offline data copy: ``--data-dir`` first, then ``$DPBENCH_DATA``."""
    roots = [data_dir, os.environ.get("DPBENCH_DATA")]
    return [Path(r).expanduser() for r in roots if r]


def validation_split(bundle: DatasetBundle, holdout: int, order_seed: int | None = None) -> DatasetBundle:
    """Train on the first ``N - holdout`` training records and evaluate on the last ``holdout`` of them.

    For tuning hyperparameters without touching the test split. The split is fixed, so every mechanism
    tunes on the same records. ``order_seed`` first puts the training records in a fixed seeded order,
    for files sorted by label (IMDb's training file holds all negative reviews, then all positive ones).
    """
    if not 0 < holdout < bundle.train_size:
        raise ValueError(f"holdout {holdout} must be in (0, {bundle.train_size})")
    x, y = bundle.train_x, bundle.train_y
    if order_seed is not None:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(order_seed))
        x, y = x[order], y[order]
    keep = bundle.train_size - holdout
    return dataclasses.replace(
        bundle, name=f"{bundle.name}_val", variant=validation_variant(bundle.variant, holdout),
        train_x=x[:keep], train_y=y[:keep], test_x=x[keep:], test_y=y[keep:])


def validation_variant(variant: str, holdout: int) -> str:
    """The ``dataset_variant`` of a validation split: ``mnist-val10k``, ``synthetic-val128``."""
    size = f"{holdout // 1000}k" if holdout % 1000 == 0 else str(holdout)
    return f"{variant}-val{size}"


