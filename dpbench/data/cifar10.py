"""CIFAR-10 through torchvision online, or the offline JPEG copy, plus optional augmentation.

Online users get torchvision's ``CIFAR10`` download (``dataset_variant`` = ``cifar10``). Offline, a
folder laid out like the shared data copy holds ``cifar10/cifar10_jpeg_q75.npz`` (every image
JPEG-recompressed at quality 75; ``dataset_variant`` = ``cifar10-jpeg-q75``, expect accuracy a
little below published figures). The JPEGs are decoded once with Pillow and cached as uint8 tensors
under ``cache_dir()``, keyed by a hash of the source file.

Normalisation uses the ImageNet per-channel mean and std, as Tramer & Boneh (2021) and ModelMix
(Xiao et al. 2022) do: public constants, so no statistic of the private training set is used.

Augmented variants, as separate dataset names so that they enter the config hash:
``cifar10_aug`` (random crop with 4-pixel padding + horizontal flip, one augmentation per example)
and ``cifar10_aug{K}`` for K in 4, 8, 16 (augmentation multiplicity, De et al. 2022: each sampled
example is augmented K times and its K gradients are averaged before clipping, so the privacy
analysis is unchanged; training costs K times the compute of ``cifar10_aug``).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.transforms import v2 as T

from dpbench.data import DATASETS
from dpbench.data.base import DatasetBundle, TrainTransform, offline_roots, validation_split, validation_variant
from dpbench.storage import built_once, cache_dir, cache_remedy, reading_data_file, save_torch_atomic, source_remedy
from dpbench.errors import BadInput

OFFLINE_FILE = Path("cifar10") / "cifar10_jpeg_q75.npz"
OFFLINE_VARIANT = "cifar10-jpeg-q75"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROP_PADDING = 4
AUGMENTATION_MULTIPLICITIES = (4, 8, 16)
TRAIN_SIZE, TEST_SIZE, CLASSES = 50000, 10000, 10


def file_hash(path: Path) -> str:
    """Short sha256 of a file's bytes (cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _find_offline(data_dir: str | None) -> tuple[Path | None, list[str]]:
    tried = []
    for base in offline_roots(data_dir):
        tried.append(str(base / OFFLINE_FILE))
        if (base / OFFLINE_FILE).is_file():
            return base / OFFLINE_FILE, tried
    return None, tried


def offline_variant(data_dir: str | None) -> str:
    """``cifar10-jpeg-q75`` when the offline copy will be used, else ``cifar10`` (torchvision)."""
    return OFFLINE_VARIANT if _find_offline(data_dir)[0] is not None else "cifar10"


def _decode(jpeg: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    """Concatenated JPEG bytes -> uint8 [N, 3, 32, 32] (Pillow, RGB)."""
    from PIL import Image

    out = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(out)):
        with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())) as img:
            out[i] = np.asarray(img.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _checked(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoded splits, or a ValueError when a split's images and labels do not match up."""
    for split in ("train", "test"):
        x, y = tensors[f"{split}_x"], tensors[f"{split}_y"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32) or tuple(y.shape) != (len(x),) or not len(x):
            raise ValueError(f"{split} split has images {tuple(x.shape)} and labels {tuple(y.shape)}")
    return tensors


def decoded_offline(source: Path) -> dict[str, torch.Tensor]:
    """The offline npz decoded to uint8 tensors, from the cache when this file was decoded before."""
    with reading_data_file(source, source_remedy(source)):
        cached = cache_dir() / "cifar10" / f"jpeg-{file_hash(source)}.pt"
    with built_once(cached, "decoding the CIFAR-10 JPEGs"):
        if cached.is_file():
            with reading_data_file(cached, cache_remedy(cached)):
                return _checked(torch.load(cached))
        with reading_data_file(source, source_remedy(source)), np.load(source, allow_pickle=False) as npz:
            tensors = _checked({
                "train_x": _decode(npz["train_jpeg"], npz["train_offsets"]),
                "train_y": torch.from_numpy(npz["train_labels"].astype(np.int64)),
                "test_x": _decode(npz["test_jpeg"], npz["test_offsets"]),
                "test_y": torch.from_numpy(npz["test_labels"].astype(np.int64)),
            })
        save_torch_atomic(cached, tensors)  # a concurrent reader sees no file or the whole file
        return tensors


def _downloaded() -> dict[str, torch.Tensor]:
    root = cache_dir() / "torchvision"
    out: dict[str, torch.Tensor] = {}
    for split, train in (("train", True), ("test", False)):
        ds = torchvision.datasets.CIFAR10(root=root, train=train, download=True)
        out[f"{split}_x"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.tensor(ds.targets, dtype=torch.long)
    return out


def load_uint8(data_dir: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """CIFAR-10 as uint8 [N, 3, 32, 32] images and int64 labels, and the variant that was used."""
    source, tried = _find_offline(data_dir)
    if source is not None:
        return decoded_offline(source), OFFLINE_VARIANT
    tried.append(f"torchvision download into {cache_dir() / 'torchvision'}")
    problem = "DPBENCH_OFFLINE is set"
    if not os.environ.get("DPBENCH_OFFLINE"):
        try:
            return _downloaded(), "cifar10"
        except Exception as exc:  # no network: say where we looked and how to fix it
            problem = f"download failed: {type(exc).__name__}"
    raise BadInput(
        f"dataset 'cifar10' not found; tried {'; '.join(tried)} ({problem}). "
        f"Pass --data-dir (or set DPBENCH_DATA) to a folder holding {OFFLINE_FILE}."
    )


def random_crop_flip(padding: int = CROP_PADDING) -> TrainTransform:
    """Per-image random crop (zero-padded by ``padding`` in pixel space) and horizontal flip.

    Works on a normalised batch [B, C, H, W]; the padding value is the normalised black pixel, as
    torchvision's ``RandomCrop(32, padding=4)`` before ``Normalize`` gives. Vectorised over the batch
    because torchvision's batch transforms draw one crop for the whole batch.
    """
    fill = torch.tensor([-m / s for m, s in zip(MEAN, STD)])

    def transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        padded = fill.to(x.device, x.dtype).view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding:padding + h, padding:padding + w] = x
        dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
        flip = torch.rand(b, device=x.device, generator=generator) < 0.5
        rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
        cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        batch = torch.arange(b, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
        return out.permute(0, 3, 1, 2).contiguous()

    return transform


def load(name: str, data_dir: str | None, augmentations: int = 0) -> DatasetBundle:
    """CIFAR-10 normalised to float32; ``augmentations`` > 0 adds crop+flip with that multiplicity."""
    raw, variant = load_uint8(data_dir)
    normalise = T.Normalize(MEAN, STD)
    bundle = DatasetBundle(name, variant, normalise(raw["train_x"].float() / 255.0), raw["train_y"],
                           normalise(raw["test_x"].float() / 255.0), raw["test_y"], num_classes=CLASSES,
                           normalisation=(MEAN, STD))
    if augmentations:
        bundle.train_transform = random_crop_flip()
        bundle.augmentations = augmentations
    return bundle


@DATASETS.register("cifar10", train_size=TRAIN_SIZE, num_classes=CLASSES, input_shape=(3, 32, 32),
                   variant=offline_variant,
                   summary="CIFAR-10, 32x32 RGB, 50k/10k (Krizhevsky 2009); offline copy is JPEG q75")
def load_cifar10(data_dir: str | None = None) -> DatasetBundle:
    return load("cifar10", data_dir)


@DATASETS.register("cifar10_aug", train_size=TRAIN_SIZE, num_classes=CLASSES, input_shape=(3, 32, 32), base="cifar10",
                   variant=offline_variant, summary="CIFAR-10 with random crop (pad 4) + horizontal flip")
def load_cifar10_aug(data_dir: str | None = None) -> DatasetBundle:
    return load("cifar10_aug", data_dir, augmentations=1)


def _register_multiplicity(k: int) -> None:
    def loader(data_dir: str | None = None) -> DatasetBundle:
        return load(f"cifar10_aug{k}", data_dir, augmentations=k)

    DATASETS.register(f"cifar10_aug{k}", train_size=TRAIN_SIZE, num_classes=CLASSES, input_shape=(3, 32, 32), base="cifar10",
                      variant=offline_variant,
                      summary=f"CIFAR-10, crop+flip, {k} augmentations per example averaged before clipping "
                              f"(De et al. 2022; {k}x the compute)")(loader)


for _k in AUGMENTATION_MULTIPLICITIES:
    _register_multiplicity(_k)


#: Training images held out as the validation split of ``cifar10_val`` (the training file is in random order).
VALIDATION_HOLDOUT = 10_000


@DATASETS.register("cifar10_val", train_size=TRAIN_SIZE - VALIDATION_HOLDOUT, num_classes=CLASSES,
                   input_shape=(3, 32, 32), base="cifar10",
                   variant=lambda data_dir: validation_variant(offline_variant(data_dir), VALIDATION_HOLDOUT),
                   summary="CIFAR-10 for tuning: train on the first 40k training images, evaluate on the last 10k")
def load_cifar10_val(data_dir: str | None = None) -> DatasetBundle:
    return validation_split(load("cifar10", data_dir), VALIDATION_HOLDOUT)
