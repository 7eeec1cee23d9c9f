"""Tramer & Boneh (2021) models on ScatterNet features: ScatterNet + linear and ScatterNet + CNN.

Both are registered with ``features="scatter"``: the engine swaps the dataset's images for their
cached ScatterNet features (``dpbench.data.features``) before building them, so they are built for
feature shapes (243 x 8 x 8 for CIFAR-10, 81 x 7 x 7 for MNIST and Fashion-MNIST). The features are
stored as float16 and cast to float32 here. Normalisation is GroupNorm with 27 groups and no
affine parameters (T&B's data-independent choice, so it costs no privacy budget; T&B's other
option, private batch statistics, would need its own accounting).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dpbench.errors import BadInput
from dpbench.models import MODELS
from dpbench.models.pooling import MaxPool2d

GROUPS = 27
SCATTER_DATASETS = ("cifar10", "mnist", "fmnist")


def _check_features(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3 or input_shape[0] % GROUPS != 0 or input_shape[0] < 81:
        raise BadInput(f"model {name!r} needs ScatterNet features (81*C x H/4 x W/4), got inputs of shape "
                       f"{tuple(input_shape)}; it is meant to be run through 'dpbench run', which computes them")


class ScatterLinear(nn.Module):
    """GroupNorm(27) on the features, then one linear layer (softmax regression)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, input_shape[0], affine=False)
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.float()).flatten(1))


class ScatterCNN(nn.Module):
    """T&B's small CNNs on ScatterNet features (their Tables 9-10).

    CIFAR-10 (8x8 features): GroupNorm -> Conv 64 -> MaxPool 2 -> Conv 64 -> FC classes.
    MNIST / Fashion-MNIST (7x7): GroupNorm -> Conv 16 stride 2 -> Conv 32 -> FC 32 -> FC classes.
    All convolutions 3x3 with padding 1 and tanh.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        k, h, w = input_shape
        self.norm = nn.GroupNorm(GROUPS, k, affine=False)
        if (h, w) == (8, 8):
            self.features = nn.Sequential(nn.Conv2d(k, 64, 3, padding=1), nn.Tanh(), MaxPool2d(2, stride=2),
                                          nn.Conv2d(64, 64, 3, padding=1), nn.Tanh())
            self.classifier: nn.Module = nn.Linear(64 * 4 * 4, num_classes)
        elif (h, w) == (7, 7):
            self.features = nn.Sequential(nn.Conv2d(k, 16, 3, stride=2, padding=1), nn.Tanh(),
                                          nn.Conv2d(16, 32, 3, padding=1), nn.Tanh())
            self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, num_classes))
        else:
            raise BadInput(f"model 'scatter_cnn' has layouts for 8x8 (32x32 images) and 7x7 (28x28) features, "
                           f"got {h}x{w}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.norm(x.float())).flatten(1))


@MODELS.register("scatter_linear", datasets=SCATTER_DATASETS, features="scatter",
                 summary="T&B ScatterNet (J=2, L=8) features + GroupNorm + linear")
def scatter_linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _check_features("scatter_linear", input_shape)
    return ScatterLinear(tuple(input_shape), num_classes)


@MODELS.register("scatter_cnn", datasets=SCATTER_DATASETS, features="scatter",
                 summary="T&B ScatterNet (J=2, L=8) features + GroupNorm + small tanh CNN")
def scatter_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _check_features("scatter_cnn", input_shape)
    return ScatterCNN(tuple(input_shape), num_classes)
