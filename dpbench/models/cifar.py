"""CIFAR-10 models of the seed papers: the tanh CNN (T&B 2021, DPSUR) and ResNet-20 with GroupNorm (ModelMix)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpbench.errors import BadInput
from dpbench.models import MODELS
from dpbench.models.pooling import MaxPool2d

CIFAR_DATASETS = ("cifar10", "cifar10_aug", "cifar10_aug4", "cifar10_aug8", "cifar10_aug16")


def _check_image(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3 or tuple(input_shape[1:]) != (32, 32):
        raise BadInput(f"model {name!r} needs 32x32 images, got inputs of shape {tuple(input_shape)}")


class CNNTanhCifar(nn.Module):
    """Tramer & Boneh 2021 / DPSUR Appendix B CIFAR-10 CNN.

    [Conv 32, Conv 32, MaxPool, Conv 64, Conv 64, MaxPool, Conv 128, Conv 128, MaxPool] (3x3, stride 1,
    padding 1, tanh; max-pool 2 stride 2) -> FC 128 (tanh) -> FC classes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for width in (32, 64, 128):
            for _ in range(2):
                layers += [nn.Conv2d(c, width, 3, stride=1, padding=1), nn.Tanh()]
                c = width
            layers.append(MaxPool2d(2, stride=2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(128 * 4 * 4, 128), nn.Tanh(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _group_norm(channels: int) -> nn.GroupNorm:
    # The groups Opacus' BatchNorm -> GroupNorm conversion picks, which ModelMix's code relies on.
    return nn.GroupNorm(min(32, channels), channels)


class _PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _group_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = _group_norm(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20GN(nn.Module):
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 basic blocks, 16/32/64 channels, option-A
    shortcuts, GroupNorm in place of BatchNorm (ModelMix, Xiao et al. 2022, §5.2); about 0.27 M parameters."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.norm = _group_norm(16)
        stages: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                stages.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(F.relu(self.norm(self.conv(x))))
        return self.fc(out.mean(dim=(2, 3)))


@MODELS.register("cnn_tanh_cifar", datasets=CIFAR_DATASETS,
                 summary="T&B / DPSUR CIFAR-10 tanh CNN: 6 conv (32-32-64-64-128-128) + FC 128")
def cnn_tanh_cifar(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _check_image("cnn_tanh_cifar", input_shape)
    return CNNTanhCifar(in_channels=input_shape[0], num_classes=num_classes)


@MODELS.register("resnet20_gn", datasets=CIFAR_DATASETS,
                 summary="ResNet-20 (16/32/64 channels) with GroupNorm, as in ModelMix")
def resnet20_gn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _check_image("resnet20_gn", input_shape)
    return ResNet20GN(in_channels=input_shape[0], num_classes=num_classes)
