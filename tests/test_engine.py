"""The shared training loop: physical batching, empty batches, seeding, the canary hook, validators."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule

from dpbench.config import resolve
from dpbench.data import load_dataset
from dpbench.engine import train
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.models import MODELS
from dpbench.registry import Entry

DATA = load_dataset("synthetic")


def cfg(**kw):
    base = resolve({"mech": "dpsgd", "dataset": "synthetic", "eps": 3.0, "steps": 5})
    return dataclasses.replace(base, **kw)


def params_after(c, noise=1.0, steps=5):
    out = train(c, get_mechanism(c.mech)(), DATA, noise, steps, torch.device("cpu"), show_progress=False)
    return torch.cat([p.detach().flatten() for p in out.model.parameters()])


def test_physical_batch_size_changes_no_result():
    a = params_after(cfg(physical_batch_size=64))
    b = params_after(cfg(physical_batch_size=7))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_seed_determines_the_run():
    torch.testing.assert_close(params_after(cfg(seed=3)), params_after(cfg(seed=3)), rtol=0, atol=0)
    assert not torch.equal(params_after(cfg(seed=3)), params_after(cfg(seed=4)))


def test_secure_mode_is_not_reproducible():
    assert not torch.equal(params_after(cfg(secure=True)), params_after(cfg(secure=True)))


def test_empty_batches_still_step_with_noise():
    # q = 1/512: most of the 20 Poisson batches are empty; each still adds noise and counts as a step.
    c = cfg(batch_size=1, lr=0.1, momentum=0.0)
    still = params_after(c, noise=0.0, steps=20)
    noisy = params_after(c, noise=1.0, steps=20)
    assert torch.isfinite(noisy).all()
    assert (noisy - still).abs().max() > 0.01


def test_noise_free_dpsgd_with_huge_clip_is_sgd_on_the_poisson_batch():
    """With C large and sigma 0, the private path equals the non-private path (same sampler)."""
    private = params_after(cfg(clip=1e6, momentum=0.0), noise=0.0)
    plain = params_after(cfg(mech="nonprivate", clip=1e6, momentum=0.0), noise=0.0)
    torch.testing.assert_close(private, plain, rtol=1e-4, atol=1e-5)


def _one_step(model_seed: int, x, y, canary=None, noise=0.0, gen_seed=0, clip=1.0, b=4):
    torch.manual_seed(model_seed)
    model = GradSampleModule(nn.Linear(3, 2), loss_reduction="mean")
    opt = get_mechanism("dpsgd")().make_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=noise,
                                                  max_grad_norm=clip, expected_batch_size=b,
                                                  generator=torch.Generator().manual_seed(gen_seed))
    opt.canary = canary
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # the release, then the update: p.grad holds the released mean
    summed = [p.summed_grad.clone() for p in opt.params]
    return [p.grad.clone() for p in opt.params], summed


def test_canary_is_added_to_the_sum_before_noise_and_scaling():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    direction = [torch.ones(2, 3), torch.zeros(2)]
    contribution = get_mechanism("dpsgd")().canary_contribution(direction, clip=0.5)
    assert sum(float(c.pow(2).sum()) for c in contribution) == pytest.approx(0.25)
    base, _ = _one_step(0, x, y)
    with_canary, _ = _one_step(0, x, y, canary=lambda: contribution)
    for g0, g1, c in zip(base, with_canary, contribution):
        torch.testing.assert_close(g1 - g0, c / 4)


def test_noise_scale_does_not_depend_on_the_batch():
    noise = []
    for data_seed in (1, 2):
        g = torch.Generator().manual_seed(data_seed)
        x, y = torch.randn(4, 3, generator=g) * data_seed * 10, torch.tensor([0, 1, 1, 1])
        grads, summed = _one_step(0, x, y, noise=1.3, gen_seed=9)
        noise.append(torch.cat([(gr * 4 - s.view_as(gr)).flatten() for gr, s in zip(grads, summed)]))
    torch.testing.assert_close(noise[0], noise[1])
    assert noise[0].std() == pytest.approx(1.3, rel=0.9)  # 8 draws of N(0, (sigma C)^2)


def test_batchnorm_model_is_rejected_for_private_training(monkeypatch):
    def bn_model(input_shape, num_classes):
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(num_classes))

    monkeypatch.setitem(MODELS._entries, "bn_test", Entry("bn_test", bn_model, {}))
    with pytest.raises(BadInput, match="BatchNorm"):
        params_after(cfg(model="bn_test"))


@pytest.mark.parametrize("mech", ["dpsgd", "dpis", "nonprivate"])
def test_interim_evaluations_report_at_their_fractions_and_change_nothing(mech):
    from dpbench.engine import Interim, evaluate

    c = cfg(mech=mech, steps=8)
    plain = train(c, get_mechanism(mech)(), DATA, 1.0, 8, torch.device("cpu"), show_progress=False)
    seen = []
    with_interim = train(c, get_mechanism(mech)(), DATA, 1.0, 8, torch.device("cpu"), show_progress=False,
                         interim=Interim((0.25, 0.5, 0.75, 1.0), lambda step, steps, acc: seen.append((step, steps, acc))))
    assert [s for s, _, _ in seen] == [2, 4, 6]  # the last step is the final evaluation, not an interim one
    assert all(total == 8 and 0 <= acc <= 1 for _, total, acc in seen)
    for a, b in zip(plain.model.parameters(), with_interim.model.parameters()):
        assert torch.equal(a, b)  # evaluating consumed no randomness and changed no state
    assert plain.test_acc == with_interim.test_acc == evaluate(with_interim.model, DATA.test_x, DATA.test_y)[0]


def test_an_interim_report_that_raises_stops_the_run():
    from dpbench.engine import Interim

    class Stop(Exception):
        pass

    def stop(step, steps, acc):  # noqa: ANN001
        raise Stop(step)

    with pytest.raises(Stop, match="4"):
        train(cfg(steps=8), get_mechanism("dpsgd")(), DATA, 1.0, 8, torch.device("cpu"), show_progress=False,
              interim=Interim((0.5,), stop))


def test_validation_splits_hold_out_the_end_of_the_training_split_and_never_the_test_split():
    from dpbench.data import DATASETS, dataset_variant
    from dpbench.data.base import validation_split

    full, val = load_dataset("synthetic"), load_dataset("synthetic_val")
    assert val.train_size == DATASETS.entry("synthetic_val").meta["train_size"] == 384
    assert torch.equal(val.train_x, full.train_x[:384]) and torch.equal(val.test_x, full.train_x[384:])
    assert dataset_variant("synthetic_val") == val.variant == "synthetic-val128"
    for name, base, size in (("cifar10_val", "cifar10", 40000), ("imdb_val", "imdb", 20000)):
        meta = DATASETS.entry(name).meta
        assert meta["base"] == base and meta["train_size"] == size
    # a label-sorted file (IMDb's) gets a fixed seeded order first, so both labels are held out
    sorted_bundle = dataclasses.replace(full, train_y=torch.sort(full.train_y).values)
    plain = validation_split(sorted_bundle, 128)
    shuffled = validation_split(sorted_bundle, 128, order_seed=1)
    assert plain.test_y.unique().tolist() == [7, 8, 9] and shuffled.test_y.unique().numel() == 10
    again = validation_split(sorted_bundle, 128, order_seed=1)
    assert torch.equal(shuffled.test_x, again.test_x)  # the same records every time
