"""Linear (softmax regression) model: the smallest model, for tests and audits."""

from __future__ import annotations

import math

import torch.nn as nn

from dpbench.models import MODELS


@MODELS.register("linear", datasets=("*",), summary="softmax regression on the flattened input")
def linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
