"""What a model trains on: the dataset's inputs, or the fixed features the model declares (``features`` meta).

Here, not in the data package, because it reads the model registry: data never imports models.
"""

from __future__ import annotations

import torch

from dpbench.data.base import DatasetBundle
from dpbench.data.features import FEATURES
from dpbench.models import MODELS


def prepare_for_model(bundle: DatasetBundle, model: str, device: torch.device | str = "cpu") -> DatasetBundle:
    """The inputs model ``model`` trains on: the bundle itself, or the features the model asks for."""
    features = MODELS.entry(model).meta.get("features")
    if features is None:
        return bundle
    return FEATURES[features][0](bundle, device)


def model_input_shape(model: str, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """What ``model`` sees for a dataset of inputs shaped ``image_shape`` (without loading it)."""
    features = MODELS.entry(model).meta.get("features")
    return tuple(image_shape) if features is None else FEATURES[features][1](tuple(image_shape))
