"""A tiny deterministic 28x28 dataset for tests: ten fixed templates plus Gaussian noise."""

from __future__ import annotations

import torch

from dpbench.data import DATASETS
from dpbench.data.base import DatasetBundle

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
