"""A tiny deterministic 28x28 dataset for tests: ten fixed templates plus Gaussian noise."""

from __future__ import annotations

import torch

from dpbench.data import DATASETS
from dpbench.data.base import DatasetBundle, validation_split, validation_variant

TRAIN_SIZE, TEST_SIZE, CLASSES = 512, 256, 10


@DATASETS.register("synthetic", train_size=TRAIN_SIZE, num_classes=CLASSES, summary="tiny deterministic 28x28 toy data (tests; no files)")
def load_synthetic(data_dir: str | None = None) -> DatasetBundle:
    g = torch.Generator().manual_seed(20240601)
    templates = torch.randn(CLASSES, 1, 28, 28, generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % CLASSES
        x = templates[y] + 1.5 * torch.randn(n, 1, 28, 28, generator=g)
        return x, y

    train_x, train_y = split(TRAIN_SIZE)
    test_x, test_y = split(TEST_SIZE)
    return DatasetBundle("synthetic", "synthetic", train_x, train_y, test_x, test_y, num_classes=CLASSES)


#: Training records held out as the validation split of ``synthetic_val``.
VALIDATION_HOLDOUT = 128


@DATASETS.register("synthetic_val", train_size=TRAIN_SIZE - VALIDATION_HOLDOUT, num_classes=CLASSES,
                   base="synthetic", variant=validation_variant("synthetic", VALIDATION_HOLDOUT),
                   summary="synthetic for tuning tests: train on 384, evaluate on the last 128 training records")
def load_synthetic_val(data_dir: str | None = None) -> DatasetBundle:
    return validation_split(load_synthetic(data_dir), VALIDATION_HOLDOUT)
