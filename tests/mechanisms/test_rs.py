"""Random sparsification: mask count and sharing, schedule, masked clipping and noise, accounting, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.config import resolve
from dpbench.data import DatasetBundle, load_dataset
from dpbench.engine import train
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms.rs import chunk_of_step, draw_keep_mask, drop_rate, mask_chunks
from dpbench.privacy import account, calibrate

DATA = load_dataset("synthetic")
SHAPES = [torch.Size([3, 4]), torch.Size([5]), torch.Size([2, 2, 2])]  # d = 25


# -- the mask --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.0, 0.04, 0.4, 0.5, 0.9, 0.99])
def test_mask_drops_exactly_floor_p_d(rate):
    masks = draw_keep_mask(SHAPES, rate, torch.Generator().manual_seed(0))
    assert [m.shape for m in masks] == SHAPES
    flat = torch.cat([m.flatten() for m in masks])
    assert set(flat.tolist()) <= {0.0, 1.0}
    assert int((flat == 0).sum()) == math.floor(rate * 25)


def test_mask_is_one_global_draw_not_per_layer():
    # Per-layer masks would drop exactly half of each layer; a global permutation varies the split.
    gen = torch.Generator().manual_seed(1)
    first_layer_drops = Counter(int((draw_keep_mask([torch.Size([10]), torch.Size([10])], 0.5, gen)[0] == 0).sum())
                                for _ in range(30))
    assert len(first_layer_drops) > 2


def test_mask_depends_on_the_generator_only():
    a = draw_keep_mask(SHAPES, 0.5, torch.Generator().manual_seed(7))
    b = draw_keep_mask(SHAPES, 0.5, torch.Generator().manual_seed(7))
    c = draw_keep_mask(SHAPES, 0.5, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# -- the schedule ----------------------------------------------------------------------------------

def test_schedule_rises_linearly_from_zero_to_p_final():
    # MNIST at B = 512, 10 epochs: T = 1171 steps, round(N/B) = 117 steps per epoch, 10 masks.
    chunks = mask_chunks(1171, 117, 1)
    assert chunks == 10
    assert chunk_of_step(0, 1171, chunks) == 0 and chunk_of_step(1170, 1171, chunks) == 9
    rates = [drop_rate(k, chunks, 0.9) for k in range(chunks)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.9)
    assert [b - a for a, b in zip(rates, rates[1:])] == pytest.approx([0.1] * 9)
    lengths = Counter(chunk_of_step(s, 1171, chunks) for s in range(1171))
    assert sorted(lengths) == list(range(10)) and max(lengths.values()) - min(lengths.values()) <= 1


def test_refresh_draws_r_masks_per_epoch_on_the_same_ramp():
    chunks = mask_chunks(1171, 117, 5)
    assert chunks == 50
    assert drop_rate(0, chunks, 0.9) == 0.0 and drop_rate(49, chunks, 0.9) == pytest.approx(0.9)
    assert drop_rate(5, chunks, 0.9) == pytest.approx(0.9 * 5 / 49)


def test_single_chunk_runs_use_the_final_rate():
    assert mask_chunks(4, 8, 1) == 1 and chunk_of_step(3, 4, 1) == 0
    assert drop_rate(0, 1, 0.9) == 0.9


def test_bad_parameters_are_refused():
    with pytest.raises(BadInput, match="p_final"):
        get_mechanism("rs")(p_final=1.0)
    with pytest.raises(BadInput, match="refresh"):
        get_mechanism("rs")(refresh=0)


# -- one step --------------------------------------------------------------------------------------

def _optimizer(noise=0.0, clip=1.0, rate=0.5, lr=1.0, b=4):
    torch.manual_seed(0)
    model = GradSampleModule(nn.Linear(5, 4), loss_reduction="mean")  # d = 24
    opt = get_mechanism("rs")().make_optimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=noise,
                                               max_grad_norm=clip, expected_batch_size=b,
                                               generator=torch.Generator().manual_seed(3))
    dropped = opt.mechanism.set_drop_rate(rate, opt.params, torch.Generator().manual_seed(11)) if rate is not None else None
    return model, opt, dropped


def _batch(scale=1.0):
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, 5, generator=g) * scale, torch.tensor([0, 1, 2, 3])


def test_every_sample_is_masked_by_the_same_mask_then_clipped_on_the_masked_norm():
    x, y = _batch(scale=10.0)
    model, opt, dropped = _optimizer(clip=0.3)
    assert dropped == 12
    keep = torch.cat([m.flatten() for m in opt.mechanism.keep_masks])
    per_sample = []
    for i in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model._module(x[i:i + 1]), y[i:i + 1]).backward()
        per_sample.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.pre_step()
    summed = torch.cat([p.summed_grad.flatten() for p in opt.params])
    assert bool((summed[keep == 0] == 0).all())  # the same coordinates gone from every sample's contribution
    assert all(bool((g[keep == 0] != 0).any()) for g in per_sample)  # which all had something there
    expected = sum((keep * g) * min(1.0, 0.3 / (float((keep * g).norm()) + 1e-6)) for g in per_sample)
    torch.testing.assert_close(torch.cat([p.summed_grad.flatten() for p in opt.params]), expected)
    # Clipping on the full norm would scale the kept part less: the order is the method.
    wrong = sum((keep * g) * min(1.0, 0.3 / float(g.norm())) for g in per_sample)
    assert not torch.allclose(expected, wrong)


def test_noise_only_on_kept_coordinates_and_from_dpsgds_stream():
    x, y = _batch()
    grads = {}
    for rate in (None, 0.5):  # None: no mask, which is dense DP-SGD
        model, opt, _ = _optimizer(noise=2.0, rate=rate, lr=1.0)
        before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        grads[rate] = torch.cat([p.grad.flatten() for p in opt.params])
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        if rate is not None:
            keep = torch.cat([m.flatten() for m in opt.mechanism.keep_masks])
            assert bool((grads[rate][keep == 0] == 0).all())
            assert bool((grads[rate][keep == 1] != 0).all())
            assert torch.equal(after[keep == 0], before[keep == 0])  # no momentum: dropped weights frozen
            noise_dense = grads[None] * 4 - dense_sum
            noise_rs = grads[rate] * 4 - torch.cat([p.summed_grad.flatten() for p in opt.params])
            torch.testing.assert_close(noise_rs, keep * noise_dense, rtol=1e-5, atol=1e-5)
            assert float(noise_rs[keep == 1].std()) == pytest.approx(2.0, rel=0.5)  # N(0, (sigma C)^2), C = 1
        else:
            dense_sum = torch.cat([p.summed_grad.flatten() for p in opt.params])


@pytest.mark.parametrize("mask_momentum", [False, True])
def test_momentum_buffer_moves_dropped_coordinates_unless_masked(mask_momentum):
    # A dense step fills SGD's buffer everywhere; after a sparse mask is drawn the buffer alone would still
    # move the dropped coordinates (the official code's behaviour, our default).
    x, y = _batch()
    torch.manual_seed(0)
    model = GradSampleModule(nn.Linear(5, 4), loss_reduction="mean")
    opt = get_mechanism("rs")(mask_momentum=mask_momentum).make_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4, generator=torch.Generator().manual_seed(3))
    for rate in (0.0, 0.5):
        opt.mechanism.set_drop_rate(rate, opt.params, torch.Generator().manual_seed(11))
        before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    dropped = torch.cat([m.flatten() for m in opt.mechanism.keep_masks]) == 0
    assert bool((after[~dropped] != before[~dropped]).all())
    moved = after[dropped] != before[dropped]
    if mask_momentum:
        assert not bool(moved.any())
    else:
        assert bool(moved.all())


def test_canary_lives_on_kept_coordinates_with_norm_c():
    _, opt, _ = _optimizer()
    mech = opt.mechanism
    direction = [torch.ones(4, 5), torch.ones(4)]
    contribution = torch.cat([c.flatten() for c in mech.canary_contribution(direction, clip=0.5)])
    keep = torch.cat([m.flatten() for m in opt.mechanism.keep_masks])
    assert float(contribution.norm()) == pytest.approx(0.5)
    assert bool((contribution[keep == 0] == 0).all())


# -- accounting ------------------------------------------------------------------------------------

def test_eps_and_calibration_equal_dpsgd():
    rs, dpsgd = get_mechanism("rs")(p_final=0.9, refresh=5), get_mechanism("dpsgd")()
    assert rs.accountant == "sgm-rdp" and rs.rdp_only_reason is None
    for sigma, q, steps in ((1.0, 0.01, 1000), (0.7, 0.1, 50), (2.5, 512 / 60000, 1171)):
        ours = account(rs, sigma, q, steps, 1e-5, with_others=False)
        ref = account(dpsgd, sigma, q, steps, 1e-5, with_others=False)
        assert ours.eps == ref.eps and ours.eps_classic == ref.eps_classic
    assert calibrate(rs, 3.0, 0.01, 500, 1e-5) == calibrate(dpsgd, 3.0, 0.01, 500, 1e-5)


# -- through the shared loop -----------------------------------------------------------------------

def _train(mech_name: str, data: DatasetBundle = DATA, steps: int = 16, **params):
    c = dataclasses.replace(resolve({"mech": mech_name, "dataset": "synthetic", "eps": 3.0, "steps": steps}),
                            momentum=0.0)
    mech = get_mechanism(mech_name)(**params)
    out = train(c, mech, data, 1.0, steps, torch.device("cpu"), show_progress=False)
    return mech, torch.cat([p.detach().flatten() for p in out.model.parameters()])


def test_p_final_zero_is_dpsgd_bit_for_bit():
    _, rs = _train("rs", p_final=0.0)
    _, dpsgd = _train("dpsgd")
    assert torch.equal(rs, dpsgd)


def test_masks_follow_the_schedule_in_training_and_ignore_the_data():
    # Synthetic: N = 512, B = 64, so 8 steps per epoch; 16 steps with refresh 2 give 4 masks.
    mech, params = _train("rs", refresh=2)
    d = params.numel()
    assert [step for step, _, _ in mech.mask_history] == [0, 4, 8, 12]
    assert [rate for _, rate, _ in mech.mask_history] == pytest.approx([0.0, 0.3, 0.6, 0.9])
    assert [n for _, _, n in mech.mask_history] == [math.floor(r * d) for _, r, _ in mech.mask_history]
    shuffled = dataclasses.replace(DATA, train_y=DATA.train_y.roll(1), train_x=DATA.train_x.flip(0))
    other, other_params = _train("rs", data=shuffled, refresh=2)
    assert all(torch.equal(a, b) for a, b in zip(mech.keep_masks, other.keep_masks))
    assert not torch.equal(params, other_params)


def test_rs_end_to_end_through_the_cli():
    runner = CliRunner()
    quick = ["--dataset", "synthetic", "--steps", "4", "--eps", "2", "--quiet"]
    res = runner.invoke(app, ["run", "--mech", "rs", *quick, "--set", "p_final=0.5"])
    assert res.exit_code == 0, res.output
    (row,) = list(csv.DictReader(open("results/runs.csv")))
    assert row["mech"] == "rs" and row["accountant"] == "sgm-rdp" and float(row["eps_spent"]) <= 2.0
    assert "--set p_final=0.5" in row["command"]
    assert json.loads(row["mech_params"]) == {"p_final": 0.5, "refresh": 1, "mask_momentum": False}


def test_resume_mid_chunk_keeps_the_mask_in_force_and_matches_a_straight_run(tmp_path):
    # Chunks of 4 steps (refresh 2, 8 steps per epoch); killed at step 6, inside the chunk drawn at step 4.
    from dpbench.checkpoint import Checkpointer

    c = dataclasses.replace(resolve({"mech": "rs", "dataset": "synthetic", "eps": 3.0, "steps": 16}), momentum=0.0)

    def run(mech, **kw):
        out = train(c, mech, DATA, 1.0, 16, torch.device("cpu"), show_progress=False, **kw)
        return torch.cat([p.detach().flatten() for p in out.model.parameters()])

    straight_mech = get_mechanism("rs")(refresh=2)
    straight = run(straight_mech)

    class Killed(Exception):
        pass

    class DiesAtStep6(type(straight_mech)):
        def begin_step(self, ctx, step):
            if step == 6:
                raise Killed
            super().begin_step(ctx, step)

    ck = Checkpointer(tmp_path / "ck.pt", every_s=0.0)
    with pytest.raises(Killed):
        run(DiesAtStep6(refresh=2), checkpointer=ck)
    assert ck.load()["step"] == 6
    resumed_mech = get_mechanism("rs")(refresh=2)
    resumed = run(resumed_mech, checkpointer=ck, resume=True)
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)
    assert resumed_mech.mask_history == straight_mech.mask_history
