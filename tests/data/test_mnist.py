"""MNIST and Fashion-MNIST loaders on tiny gzipped IDX files in the offline copy's layout."""

from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.data import dataset_variant, load_dataset
from dpbench.data import mnist
from dpbench.errors import BadInput

N_TRAIN, N_TEST = 12, 5
MEAN_STD = {"mnist": (0.1307, 0.3081), "fmnist": (0.2860, 0.3530)}


def _idx(path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file: magic 0x08 (ubyte), dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _write_copy(folder, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(N_TRAIN) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(N_TEST) * 3) % 10,
    }
    folder.mkdir(parents=True)
    for name, array in arrays.items():
        _idx(folder / f"{name}.gz", array)
    return arrays


@pytest.fixture
def mnist_root(tmp_path):
    """A data folder holding mnist/ and fmnist/ with different tiny images."""
    root = tmp_path / "data"
    return root, {"mnist": _write_copy(root / "mnist", 0), "fmnist": _write_copy(root / "fmnist", 1)}


@pytest.mark.parametrize("name", ["mnist", "fmnist"])
def test_offline_copy_loads_normalised_images_and_labels(mnist_root, name):
    root, copies = mnist_root
    arrays = copies[name]
    b = load_dataset(name, str(root))
    assert b.variant == name == dataset_variant(name, str(root))
    assert b.train_x.shape == (N_TRAIN, 1, 28, 28) and b.test_x.shape == (N_TEST, 1, 28, 28)
    assert b.train_x.dtype == torch.float32 and b.train_y.dtype == torch.int64 and b.test_y.dtype == torch.int64
    assert b.train_size == N_TRAIN and b.num_classes == 10
    assert b.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert b.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    mean, std = MEAN_STD[name]  # fixed published constants, not statistics of the private data
    pixels = (b.test_x[:, 0] * std + mean) * 255
    torch.testing.assert_close(pixels, torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float(), atol=1e-3, rtol=0)


def test_offline_files_are_decompressed_once_keyed_by_their_content(mnist_root, monkeypatch):
    root, _ = mnist_root
    opened = []
    real = mnist.gzip.open
    monkeypatch.setattr(mnist.gzip, "open", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    load_dataset("mnist", str(root))
    assert len(opened) == 4
    load_dataset("mnist", str(root))
    assert len(opened) == 4  # cache hit
    load_dataset("fmnist", str(root))
    assert len(opened) == 8  # other files, other key


def test_writers_decompressing_at_once_do_not_clash(mnist_root, monkeypatch):
    """Two jobs that prepare the same cache together each finish with complete files."""
    root, arrays = mnist_root
    sources = [root / "mnist" / f"{n}.gz" for n in mnist.IDX_FILES]
    real = shutil.copyfileobj
    started, nested = [], []

    def copy_while_another_writer_runs(fin, fout, *args):
        if not started:  # the first copy: a second writer does all its work before this one writes
            started.append(1)
            nested.append(mnist._prepare_offline(mnist.torchvision.datasets.MNIST, sources))
        real(fin, fout, *args)

    monkeypatch.setattr(mnist.shutil, "copyfileobj", copy_while_another_writer_runs)
    root_dir = mnist._prepare_offline(mnist.torchvision.datasets.MNIST, sources)
    assert nested == [root_dir]
    raw = root_dir / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(mnist.IDX_FILES)  # no temporary file left behind
    with gzip.open(sources[2]) as fh:
        assert (raw / mnist.IDX_FILES[2]).read_bytes() == fh.read()


def test_folder_with_only_some_datasets_names_the_paths_tried(mnist_root):
    root, _ = mnist_root
    shutil.rmtree(root / "fmnist")
    assert load_dataset("mnist", str(root)).train_size == N_TRAIN  # the present one still loads
    with pytest.raises(BadInput, match="train-images-idx3-ubyte.gz") as err:
        load_dataset("fmnist", str(root))
    assert str(root / "fmnist") in str(err.value) and "--data-dir" in str(err.value)
    res = CliRunner().invoke(app, ["run", "--mech", "dpsgd", "--dataset", "fmnist", "--data-dir", str(root),
                                   "--eps", "3", "--steps", "1", "--quiet"])
    assert res.exit_code == 2 and str(root / "fmnist") in res.output.replace("\n", "")


def _run_exit_2_naming(path, root, out) -> str:
    """Run on ``root``; the run must exit 2 with one line naming ``path`` and write no results."""
    res = CliRunner().invoke(app, ["run", "--mech", "dpsgd", "--dataset", "mnist", "--data-dir", str(root),
                                   "--eps", "3", "--steps", "1", "--quiet", "--out", str(out)])
    text = res.output.replace("\n", "")
    assert res.exit_code == 2, res.output
    assert str(path) in text and "truncated or corrupt" in text
    assert not out.exists() and not (out.parent / "runs").exists()
    return text


def test_a_truncated_source_file_is_named_with_how_to_fix_it(mnist_root, tmp_path):
    root, _ = mnist_root
    source = root / "mnist" / "train-images-idx3-ubyte.gz"
    source.write_bytes(source.read_bytes()[:60])  # today: gzip's EOFError, shown by click as a bare "Aborted."
    text = _run_exit_2_naming(source, root, tmp_path / "res" / "runs.csv")
    assert "sha256sum -c SHA256SUMS" in text
    assert not list((tmp_path / "cache").glob("idx/*"))  # no half-built cache entry is left behind


def test_a_truncated_cache_entry_is_named_with_how_to_fix_it(mnist_root, tmp_path):
    root, _ = mnist_root
    load_dataset("mnist", str(root))
    cached = next((tmp_path / "cache" / "idx").glob("*/MNIST/raw/t10k-images-idx3-ubyte"))
    cached.write_bytes(cached.read_bytes()[:100])
    text = _run_exit_2_naming(cached, root, tmp_path / "res" / "runs.csv")
    assert f"rm {cached}" in text
    cached.unlink()  # the fix the message gives works
    assert load_dataset("mnist", str(root)).test_x.shape == (N_TEST, 1, 28, 28)


def test_idx_size_check_accepts_whole_files_and_rejects_cut_ones(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 2, 28, 28) + bytes(2 * 784))
    mnist.check_idx_size(path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="needs"):
        mnist.check_idx_size(path)
