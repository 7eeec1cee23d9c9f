"""CIFAR-10 loader on a tiny npz in the offline copy's layout, and the augmentation hook of the engine."""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.config import resolve
from dpbench.data import DatasetBundle, dataset_variant, load_dataset
from dpbench.data import cifar10
from dpbench.engine import train
from dpbench.step import average_augmentations
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from tests.concurrency import together

N_TRAIN, N_TEST = 20, 10


def _jpeg_split(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return np.concatenate(blobs), offsets


@pytest.fixture
def cifar_root(tmp_path):
    """A data folder holding cifar10/cifar10_jpeg_q75.npz with 20 + 10 smooth random images."""
    rng = np.random.default_rng(0)
    # smooth images survive JPEG nearly unchanged, so decoded pixels can be compared with the source
    coarse = rng.integers(0, 256, size=(N_TRAIN + N_TEST, 4, 4, 3)).astype(np.uint8)
    images = coarse.repeat(8, axis=1).repeat(8, axis=2)
    labels = (np.arange(N_TRAIN + N_TEST) % 10).astype(np.uint8)
    train_jpeg, train_off = _jpeg_split(images[:N_TRAIN])
    test_jpeg, test_off = _jpeg_split(images[N_TRAIN:])
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)
    np.savez(root / "cifar10" / "cifar10_jpeg_q75.npz", train_jpeg=train_jpeg, train_offsets=train_off,
             train_labels=labels[:N_TRAIN], test_jpeg=test_jpeg, test_offsets=test_off, test_labels=labels[N_TRAIN:],
             classes=np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]))
    return root, images, labels


def test_offline_copy_loads_normalised_images_and_labels(cifar_root):
    root, images, labels = cifar_root
    b = load_dataset("cifar10", str(root))
    assert b.variant == "cifar10-jpeg-q75" == dataset_variant("cifar10", str(root))
    assert b.train_x.shape == (N_TRAIN, 3, 32, 32) and b.test_x.shape == (N_TEST, 3, 32, 32)
    assert b.train_x.dtype == torch.float32 and b.train_y.dtype == torch.int64
    assert b.train_size == N_TRAIN and b.num_classes == 10
    assert b.train_y.tolist() == labels[:N_TRAIN].tolist() and b.test_y.tolist() == labels[N_TRAIN:].tolist()
    assert int(b.train_y.min()) >= 0 and int(b.train_y.max()) < 10
    mean, std = torch.tensor(cifar10.MEAN).view(1, 3, 1, 1), torch.tensor(cifar10.STD).view(1, 3, 1, 1)
    pixels = (b.train_x * std + mean) * 255
    source = torch.from_numpy(images[:N_TRAIN]).permute(0, 3, 1, 2).float()
    # JPEG q75 (with 4:2:0 chroma) of blocky colour images: about ten grey levels; a wrong channel
    # order or layout would be off by about 80
    assert (pixels - source).abs().mean() < 16


def test_offline_copy_is_decoded_once_then_read_from_the_cache(cifar_root, monkeypatch):
    root, _, _ = cifar_root
    calls = []
    real = cifar10._decode
    monkeypatch.setattr(cifar10, "_decode", lambda *a: calls.append(1) or real(*a))
    first = load_dataset("cifar10", str(root))
    assert len(calls) == 2  # train and test
    second = load_dataset("cifar10", str(root))
    assert len(calls) == 2
    torch.testing.assert_close(first.train_x, second.train_x)


def test_jobs_starting_together_decode_the_offline_copy_once(cifar_root, monkeypatch):
    root, _, _ = cifar_root
    calls = []
    real = cifar10._decode

    def slow(*a):
        calls.append(1)
        time.sleep(0.2)  # the second job arrives while the first is decoding
        return real(*a)

    monkeypatch.setattr(cifar10, "_decode", slow)
    job = lambda: load_dataset("cifar10", str(root))  # noqa: E731
    results = together(job, job)
    assert len(calls) == 2  # train and test, decoded by one job only
    assert len(results) == 2 and torch.equal(results[0].train_x, results[1].train_x)


def test_data_dir_comes_from_the_environment_too(cifar_root, monkeypatch):
    root, _, _ = cifar_root
    monkeypatch.setenv("DPBENCH_DATA", str(root))
    assert load_dataset("cifar10").variant == "cifar10-jpeg-q75"


def test_missing_copy_is_bad_input_naming_the_paths_tried(tmp_path):
    partial = tmp_path / "partial"
    (partial / "mnist").mkdir(parents=True)  # an offline folder that holds other datasets only
    assert dataset_variant("cifar10", str(partial)) == "cifar10"
    with pytest.raises(BadInput, match="cifar10_jpeg_q75.npz") as err:
        load_dataset("cifar10", str(partial))
    assert str(partial / "cifar10") in str(err.value) and "--data-dir" in str(err.value)
    res = CliRunner().invoke(app, ["run", "--mech", "dpsgd", "--dataset", "cifar10", "--data-dir", str(partial),
                                   "--eps", "3", "--steps", "1", "--quiet"])
    assert res.exit_code == 2 and "cifar10_jpeg_q75.npz" in res.output


def test_augmented_names_share_the_data_and_set_the_multiplicity(cifar_root):
    root, _, _ = cifar_root
    plain = load_dataset("cifar10", str(root))
    aug = load_dataset("cifar10_aug4", str(root))
    assert plain.train_transform is None and plain.augmentations == 1
    assert aug.train_transform is not None and aug.augmentations == 4
    torch.testing.assert_close(plain.train_x, aug.train_x)


def test_random_crop_flip_is_a_padded_shifted_possibly_mirrored_copy():
    x = torch.randn(16, 3, 32, 32)
    transform = cifar10.random_crop_flip()
    out = transform(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    again = transform(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, again)  # reproducible from the generator
    fill = torch.tensor([-m / s for m, s in zip(cifar10.MEAN, cifar10.STD)]).view(3, 1, 1)
    padded = fill.expand(3, 40, 40).clone().unsqueeze(0).repeat(16, 1, 1, 1)
    padded[:, :, 4:36, 4:36] = x
    changed = 0
    for i in range(16):
        candidates = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)
        changed += not torch.equal(out[i], x[i])
    assert changed > 8  # most images moved or flipped


def test_average_augmentations_gives_one_gradient_per_example():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad_sample = torch.arange(4 * 3 * 6, dtype=torch.float32).view(12, 2, 3)  # 4 examples x 3 copies
    average_augmentations([p], 3)
    assert p.grad_sample.shape == (4, 2, 3)
    torch.testing.assert_close(p.grad_sample[1], torch.arange(18, 36, dtype=torch.float32).view(3, 2, 3).mean(0))


def _synthetic(copies: int, transform) -> DatasetBundle:
    data = load_dataset("synthetic")
    return dataclasses.replace(data, train_transform=transform, augmentations=copies)


@pytest.mark.parametrize("mech", ["dpsgd", "nonprivate"])
def test_identical_copies_change_nothing_so_copies_are_averaged_not_counted(mech):
    """K identical augmentations must give exactly the un-augmented update: each example still
    contributes one per-sample gradient (clipping after the average), and the sum is not K-fold."""
    c = dataclasses.replace(resolve({"mech": mech, "dataset": "synthetic", "eps": 3.0, "steps": 3}),
                            model="linear", physical_batch_size=16)
    identity = lambda x, g: x  # noqa: E731
    noise = 1.0 if mech == "dpsgd" else 0.0

    def params(data):
        out = train(c, get_mechanism(mech)(), data, noise, 3, torch.device("cpu"), show_progress=False)
        return torch.cat([p.detach().flatten() for p in out.model.parameters()])

    base = params(_synthetic(1, None))
    torch.testing.assert_close(params(_synthetic(3, identity)), base, rtol=1e-4, atol=1e-6)
    shifted = params(_synthetic(3, lambda x, g: x + torch.randn(x.shape, generator=g)))
    assert not torch.allclose(shifted, base)


def _run(root, out):
    return CliRunner().invoke(app, ["run", "--mech", "dpsgd", "--dataset", "cifar10", "--model", "linear",
                                    "--data-dir", str(root), "--eps", "3", "--steps", "1", "--quiet", "--out", str(out)])


def test_a_truncated_source_file_is_named_exit_2(cifar_root, tmp_path):
    root, _, _ = cifar_root
    source = root / "cifar10" / "cifar10_jpeg_q75.npz"
    source.write_bytes(source.read_bytes()[:1000])
    res = _run(root, tmp_path / "res" / "runs.csv")
    text = res.output.replace("\n", "")
    assert res.exit_code == 2 and str(source) in text and "truncated or corrupt" in text
    assert not (tmp_path / "res").exists()


def test_a_corrupt_cache_entry_is_named_exit_2(cifar_root, tmp_path):
    root, _, _ = cifar_root
    load_dataset("cifar10", str(root))
    cached = next((tmp_path / "cache" / "cifar10").glob("jpeg-*.pt"))
    cached.write_bytes(cached.read_bytes()[:300])
    res = _run(root, tmp_path / "res" / "runs.csv")
    text = res.output.replace("\n", "")
    assert res.exit_code == 2 and str(cached) in text and f"rm {cached}" in text
    assert not (tmp_path / "res").exists()
