"""Every registered model: forward, Opacus per-sample gradients, validator; ScatterNet features and caching."""

from __future__ import annotations

import csv
import dataclasses
import time

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.config import resolve
from dpbench.data import DATASETS, load_dataset
from dpbench.data import features
from dpbench.data.imdb import PAD, VOCAB_SIZE
from dpbench.engine import DEFAULT_PHYSICAL_BATCH, physical_batch_size
from dpbench.errors import BadInput
from dpbench.models import MODELS, build_model, inputs
from tests.concurrency import together

SHORT_TEXT = 12  # the text models do not depend on the sequence length; short keeps the LSTM quick


def _example(model: str, batch: int = 2) -> tuple[torch.nn.Module, torch.Tensor, int]:
    """The model built for its first dataset, a batch of matching inputs, and the class count."""
    meta = MODELS.entry(model).meta
    dataset = next((d for d in meta["datasets"] if d in DATASETS), "mnist")
    dmeta = DATASETS.entry(dataset).meta
    shape = inputs.model_input_shape(model, tuple(dmeta.get("input_shape", (1, 28, 28))))
    classes = dmeta["num_classes"]
    g = torch.Generator().manual_seed(0)
    if len(shape) == 1:
        shape = (SHORT_TEXT,)
        x = torch.randint(2, VOCAB_SIZE, (batch, SHORT_TEXT), generator=g)
        x[0, -3:] = PAD
    else:
        x = torch.randn(batch, *shape, generator=g)
        if meta.get("features"):
            x = x.half()  # the feature cache stores float16
    return build_model(model, shape, classes), x, classes


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_has_per_sample_gradients(name):
    torch.manual_seed(0)
    model, x, classes = _example(name)
    assert ModuleValidator.validate(model, strict=False) == []
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    out = gsm(x)
    assert out.shape == (2, classes)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    for p in model.parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (2, *p.shape)
        assert torch.isfinite(p.grad_sample).all()


@pytest.mark.parametrize("name", ["embbag", "bilstm", "scatter_cnn", "cnn_tanh_cifar", "resnet20_gn", "cnn_tanh"])
def test_per_sample_gradients_match_single_example_gradients(name):
    torch.manual_seed(0)
    model, x, _ = _example(name)
    if name == "embbag":
        x[1, :6] = x[1, 0]  # a repeated word: its gradient must count once per occurrence
    y = torch.tensor([1, 0])
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(2):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-3, atol=1e-5)


def test_models_reject_inputs_they_were_not_made_for():
    with pytest.raises(BadInput, match="32x32"):
        build_model("cnn_tanh_cifar", (1, 28, 28), 10)
    with pytest.raises(BadInput, match="ScatterNet features"):
        build_model("scatter_linear", (3, 32, 32), 10)
    with pytest.raises(BadInput, match="token"):
        build_model("bilstm", (1, 28, 28), 2)


def test_batchnorm_models_are_rejected_for_private_training_not_converted(monkeypatch):
    from dpbench.engine import train
    from dpbench.mechanisms import get_mechanism
    from dpbench.registry import Entry

    bn = Entry("bn_net", lambda input_shape, num_classes: torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(num_classes)))
    monkeypatch.setitem(MODELS._entries, "bn_net", bn)
    c = dataclasses.replace(resolve({"mech": "dpsgd", "dataset": "synthetic", "eps": 3.0, "steps": 1}), model="bn_net")
    with pytest.raises(BadInput, match="cannot be trained privately"):
        train(c, get_mechanism("dpsgd")(), load_dataset("synthetic"), 1.0, 1, torch.device("cpu"), show_progress=False)


def test_text_models_default_to_a_small_physical_batch():
    c = resolve({"mech": "dpsgd", "dataset": "imdb", "eps": 3.0, "model": "embbag"})
    assert physical_batch_size(c) == MODELS.entry("embbag").meta["physical_batch_size"] < DEFAULT_PHYSICAL_BATCH
    assert physical_batch_size(dataclasses.replace(c, physical_batch_size=5)) == 5
    assert physical_batch_size(resolve({"mech": "dpsgd", "dataset": "fmnist", "eps": 3.0})) == DEFAULT_PHYSICAL_BATCH


def test_model_recipes_are_found_before_dataset_recipes():
    assert resolve({"mech": "dpsgd", "dataset": "cifar10", "eps": 3.0}).model == "cnn_tanh_cifar"
    lin = resolve({"mech": "dpsgd", "dataset": "cifar10", "eps": 3.0, "model": "scatter_linear"})
    assert (lin.batch_size, lin.lr, lin.epochs) == (8192, 4.0, 60)
    aug = resolve({"mech": "dpsgd", "dataset": "cifar10_aug16", "eps": 3.0, "model": "resnet20_gn"})
    assert (aug.batch_size, aug.clip) == (1500, 20.0)
    assert resolve({"mech": "dpsgd", "dataset": "imdb", "eps": 3.0}).optimizer == "adam"


def test_ls_models_shows_datasets_and_parameter_counts():
    res = CliRunner().invoke(app, ["ls", "models"], env={"COLUMNS": "250"})
    assert res.exit_code == 0
    assert "parameters" in res.output
    for count in ("550,570", "269,722", "155,530", "26,010"):  # cnn_tanh_cifar, resnet20_gn, scatter_linear, cnn_tanh
        assert count in res.output


# ScatterNet features ----------------------------------------------------------------------------

def _tiny_bundle(n_train: int = 4, n_test: int = 2):
    data = load_dataset("synthetic")
    return dataclasses.replace(data, train_x=data.train_x[:n_train], train_y=data.train_y[:n_train],
                               test_x=data.test_x[:n_test], test_y=data.test_y[:n_test])


def test_scatter_features_are_computed_once_then_read_from_the_cache(monkeypatch):
    calls = []
    real = features.extract_scatter
    monkeypatch.setattr(features, "extract_scatter", lambda x, device="cpu": calls.append(len(x)) or real(x, device))
    bundle = _tiny_bundle()
    first = inputs.prepare_for_model(bundle, "scatter_linear")
    assert calls == [4, 2]
    assert first.train_x.shape == (4, 81, 7, 7) and first.test_x.shape == (2, 81, 7, 7)
    assert first.train_x.dtype == torch.float16 and torch.isfinite(first.train_x.float()).all()
    assert torch.equal(first.train_y, bundle.train_y) and first.variant == bundle.variant
    second = inputs.prepare_for_model(bundle, "scatter_cnn")
    assert calls == [4, 2]  # cache hit: keyed by the images, shared by both ScatterNet models
    assert torch.equal(second.train_x, first.train_x)
    other = dataclasses.replace(bundle, train_x=bundle.train_x + 1)
    inputs.prepare_for_model(other, "scatter_linear")
    assert calls == [4, 2, 4, 2]  # other images, other key


def test_jobs_starting_together_compute_the_scatter_features_once(monkeypatch):
    """Sweep and tune jobs start side by side on a cold cache: one computes, the other waits and reads."""
    calls = []
    real = features.extract_scatter

    def slow(x, device="cpu"):
        calls.append(len(x))
        time.sleep(0.3)  # long enough that the second job arrives while the first is computing
        return real(x, device)

    monkeypatch.setattr(features, "extract_scatter", slow)
    bundle = _tiny_bundle()
    job = lambda: inputs.prepare_for_model(bundle, "scatter_linear")  # noqa: E731
    results = together(job, job)
    assert calls == [4, 2]  # train and test once, not once per job
    assert len(results) == 2 and torch.equal(results[0].train_x, results[1].train_x)


def test_only_feature_models_get_features():
    bundle = _tiny_bundle()
    assert inputs.prepare_for_model(bundle, "cnn_tanh") is bundle
    assert inputs.model_input_shape("scatter_cnn", (3, 32, 32)) == (243, 8, 8)
    assert inputs.model_input_shape("resnet20_gn", (3, 32, 32)) == (3, 32, 32)
    with pytest.raises(BadInput, match="augments"):
        inputs.prepare_for_model(dataclasses.replace(bundle, train_transform=lambda x, g: x), "scatter_linear")


def test_run_trains_a_scatter_model_on_features(monkeypatch):
    fake = lambda x, device="cpu": torch.randn(len(x), 81, 7, 7).half()  # noqa: E731  (kymatio is tested above)
    monkeypatch.setattr(features, "extract_scatter", fake)
    res = CliRunner().invoke(app, ["run", "--mech", "dpsgd", "--dataset", "synthetic", "--model", "scatter_linear",
                                   "--eps", "3", "--steps", "2", "--batch-size", "64", "--lr", "1", "--clip", "1",
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    (row,) = list(csv.DictReader(open("results/runs.csv")))
    assert row["model"] == "scatter_linear" and row["dataset_variant"] == "synthetic"


def test_scatter_input_follows_tramer_boneh_grey_pixels_raw_colour_normalised():
    """T&B scatter MNIST-like images as [0, 1] pixels and CIFAR-10 ImageNet-normalised: the GroupNorm
    of the features is not invariant to the pixel shift, so the convention changes the features."""
    pixels = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    grey = dataclasses.replace(_tiny_bundle(3, 1), train_x=(pixels - 0.1307) / 0.3081, test_x=pixels[:1],
                               normalisation=((0.1307,), (0.3081,)))
    feats = inputs.prepare_for_model(grey, "scatter_linear")
    torch.testing.assert_close(feats.train_x, features.extract_scatter(pixels), atol=2e-3, rtol=1e-3)
    gn = torch.nn.GroupNorm(features.SCATTER_CHANNELS // 3, features.SCATTER_CHANNELS, affine=False)
    shifted = gn(features.extract_scatter(grey.train_x).float())
    assert (gn(feats.train_x.float()) - shifted).abs().mean() > 0.01  # the convention is not a no-op
    colour = dataclasses.replace(_tiny_bundle(2, 1), train_x=torch.randn(2, 3, 32, 32), test_x=torch.randn(1, 3, 32, 32),
                                 normalisation=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    torch.testing.assert_close(inputs.prepare_for_model(colour, "scatter_linear").train_x,
                               features.extract_scatter(colour.train_x))
