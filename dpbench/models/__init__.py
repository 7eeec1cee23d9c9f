"""Model zoo, registered by name: ``@MODELS.register("cnn_tanh", datasets=(...))``."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from dpbench.registry import Registry

MODELS: Registry[Any] = Registry("model")

from dpbench.models import cnn, linear  # noqa: E402,F401  (registers the built-ins)
from dpbench.models import cifar, scatter, text  # noqa: E402,F401


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Instantiate model ``name`` for inputs of ``input_shape`` (without the batch dimension)."""
    return MODELS.get(name)(input_shape=input_shape, num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "build_model", "count_parameters"]
