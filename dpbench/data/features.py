"""Fixed feature extractors that a model can ask for: ScatterNet features (Tramer & Boneh 2021).

A model registered with meta ``features="scatter"`` trains on the ScatterNet transform of the
dataset's images instead of the images: ``dpbench run --dataset cifar10 --model scatter_linear``.
The engine calls :func:`dpbench.models.inputs.prepare_for_model` once after loading the data. The transform is
data-independent (a fixed wavelet filter bank applied to each image alone), so it costs no privacy.

The scattering is kymatio's ``Scattering2D`` with J = 2 and L = 8 (the T&B setting): an image of
C x H x W becomes 81*C channels of (H/4) x (W/4), e.g. 243 x 8 x 8 for CIFAR-10 and 81 x 7 x 7 for
MNIST. Computing it for all 60k CIFAR-10 images takes several minutes on a CPU, so the features are
computed once and cached as float16 under ``cache_dir()/scatter/`` (1.9 GB for CIFAR-10, 0.6 GB
for MNIST), keyed by a hash of the input tensors and the scattering settings; the models cast them
back to float32. They are computed on the run's device (seconds on a GPU). Jobs that start together
on a cold cache compute them once: the others wait for the first (:func:`dpbench.storage.built_once`).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from dpbench.data.base import DatasetBundle
from dpbench.storage import built_once, cache_dir, cache_remedy, reading_data_file, save_torch_atomic
from dpbench.errors import BadInput

SCATTER_J, SCATTER_L = 2, 8
SCATTER_CHANNELS = 1 + SCATTER_J * SCATTER_L + SCATTER_L ** 2 * SCATTER_J * (SCATTER_J - 1) // 2  # 81
EXTRACT_BATCH = 512


def scatter_shape(image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Feature shape for an image of shape (C, H, W)."""
    if len(image_shape) != 3:
        raise BadInput(f"ScatterNet features need image inputs (C, H, W), got shape {tuple(image_shape)}")
    c, h, w = image_shape
    return c * SCATTER_CHANNELS, h // 2 ** SCATTER_J, w // 2 ** SCATTER_J


def _tensor_hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256(f"kymatio-scattering2d/J{SCATTER_J}/L{SCATTER_L}".encode())
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(memoryview(np.ascontiguousarray(t.cpu().numpy())).cast("B"))
    return h.hexdigest()[:16]


def _scattering(image_shape: tuple[int, int, int], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    # kymatio's ``kymatio.torch`` entry point imports scipy's removed ``sph_harm`` (scipy >= 1.17);
    # the frontend argument of the generic class avoids that import.
    from kymatio import Scattering2D

    scattering = Scattering2D(J=SCATTER_J, shape=image_shape[1:], L=SCATTER_L, frontend="torch").to(device)
    return scattering


@torch.no_grad()
def extract_scatter(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """ScatterNet features of images [N, C, H, W] as float16 [N, 81*C, H/4, W/4], on the CPU."""
    device = torch.device(device)
    n = len(images)
    out = torch.empty((n, *scatter_shape(tuple(images.shape[1:]))), dtype=torch.float16)
    scattering = _scattering(tuple(images.shape[1:]), device)
    for i in range(0, n, EXTRACT_BATCH):
        batch = images[i:i + EXTRACT_BATCH].to(device, torch.float32)
        feats = scattering(batch)  # [b, C, 81, H/4, W/4]
        out[i:i + len(batch)] = feats.reshape(len(batch), *out.shape[1:]).to("cpu", torch.float16)
    return out


def scatter_input(bundle: DatasetBundle, x: torch.Tensor) -> torch.Tensor:
    """The images in T&B's input convention for the scattering.

    T&B scatter grey-scale images (MNIST, Fashion-MNIST) as raw [0, 1] pixels and colour images
    (CIFAR-10) normalised with the ImageNet constants. The shift matters: the GroupNorm groups mix
    the low-pass coefficient, which moves with the mean, with wavelet coefficients, which do not.
    """
    if bundle.normalisation is None or x.shape[1] != 1:
        return x
    mean, std = (torch.tensor(v, dtype=x.dtype).view(1, -1, 1, 1) for v in bundle.normalisation)
    return x * std + mean


def scatter_features(bundle: DatasetBundle, device: torch.device | str = "cpu") -> DatasetBundle:
    """``bundle`` with its inputs replaced by (cached) ScatterNet features."""
    if bundle.train_transform is not None:
        raise BadInput(f"dataset {bundle.name!r} augments its images at training time, which precomputed "
                       f"ScatterNet features cannot follow; use the dataset without augmentation")
    train_x, test_x = scatter_input(bundle, bundle.train_x), scatter_input(bundle, bundle.test_x)
    key = _tensor_hash(train_x, test_x)
    cached = cache_dir() / "scatter" / f"{bundle.name}-{key}.pt"
    with built_once(cached, f"computing the ScatterNet features of {bundle.name}"):
        if cached.is_file():
            with reading_data_file(cached, cache_remedy(cached)):
                feats = torch.load(cached)
                if len(feats["train_x"]) != len(train_x) or len(feats["test_x"]) != len(test_x):
                    raise ValueError("feature rows differ from the dataset's")
        else:
            from rich.console import Console

            Console(stderr=True).print(f"computing ScatterNet features of {bundle.name} once (cached in "
                                       f"{cached.parent})", highlight=False, soft_wrap=True)
            feats = {"train_x": extract_scatter(train_x, device), "test_x": extract_scatter(test_x, device)}
            save_torch_atomic(cached, feats)
    return replace(bundle, train_x=feats["train_x"], test_x=feats["test_x"])


#: feature name (a model's ``features`` meta) -> (bundle transform, input-shape transform)
FEATURES: dict[str, tuple[Callable[..., DatasetBundle], Callable[[tuple[int, ...]], tuple[int, ...]]]] = {
    "scatter": (scatter_features, scatter_shape),
}
