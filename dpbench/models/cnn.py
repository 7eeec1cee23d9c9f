"""Convolutional models of the DP-SGD literature."""

from __future__ import annotations

import torch
import torch.nn as nn

from dpbench.errors import BadInput
from dpbench.models import MODELS
from dpbench.models.pooling import MaxPool2d


class CNNTanh(nn.Module):
    """Papernot et al. 2021 / Tramer & Boneh 2021 28x28 CNN with tanh (DPSUR Appendix B).

    Conv 16x(8x8) s2 p2 -> MaxPool 2 s1 -> Conv 32x(4x4) s2 -> MaxPool 2 s1 -> FC 32 -> FC 10.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 8, stride=2, padding=2)
        self.pool1 = MaxPool2d(2, stride=1)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.pool2 = MaxPool2d(2, stride=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.tanh(self.conv1(x)))
        x = self.pool2(torch.tanh(self.conv2(x)))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


@MODELS.register("cnn_tanh", datasets=("mnist", "fmnist", "synthetic"),
                 summary="28x28 tanh CNN of Papernot et al. / Tramer & Boneh (26k params)")
def cnn_tanh(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if tuple(input_shape[1:]) != (28, 28):
        raise BadInput(f"model 'cnn_tanh' needs 28x28 inputs, got {tuple(input_shape)}")
    return CNNTanh(in_channels=input_shape[0], num_classes=num_classes)
