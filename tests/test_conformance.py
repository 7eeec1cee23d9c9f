"""`dpbench check`: every built-in mechanism passes; broken mechanisms fail on the property they break."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.conformance import run_checks
from dpbench.mechanisms import MECHANISMS, get_mechanism
from dpbench.mechanisms.base import PerSample
from dpbench.mechanisms.dpsgd import DPSGD
from dpbench.registry import Entry

PRIVATE = [n for n in MECHANISMS.names(plugins=False) if get_mechanism(n).private]
#: GED's default codebook (k = 14,000) takes long to draw; the checks are the same with a short one.
PARAMS = {"ged": {"k": 8, "codebook_rows": 4}}


@pytest.mark.parametrize("grad_sample", ["fast", "reference"])
@pytest.mark.parametrize("name", PRIVATE)
def test_every_built_in_mechanism_passes(name, grad_sample):
    results = run_checks(name, PARAMS.get(name), grad_sample)
    assert [p.name for p in results] == ["contribution", "canary", "noise", "physical batch", "empty batch", "resume",
                                         "accounting"]
    assert all(p.ok for p in results), [f"{p.name}: {p.detail}" for p in results if not p.ok]


class Unclipped(DPSGD):
    """Sums raw per-sample gradients: no bound at all."""

    name = "unclipped"
    per_sample = PerSample.GRADIENTS

    def transform(self, grads, clip):  # noqa: ANN001
        return [g.sum(dim=0) for g in grads]


class Counting(DPSGD):
    """Halves its learning rate every step, counting steps on itself: saved without declaring anything."""

    name = "counting"

    def setup(self, ctx) -> None:  # noqa: ANN001
        self.steps_done = 0

    def begin_step(self, ctx, step) -> None:  # noqa: ANN001
        self.steps_done += 1
        for group in ctx.optimizer.param_groups:
            group["lr"] = ctx.cfg.lr / 2 ** self.steps_done


class Hidden(Counting):
    """The same, but it hides its count outside itself (in the class), where no checkpoint can see it."""

    name = "hidden"
    count = [0]

    def setup(self, ctx) -> None:  # noqa: ANN001
        Hidden.count[0] = 0

    def begin_step(self, ctx, step) -> None:  # noqa: ANN001
        Hidden.count[0] += 1
        for group in ctx.optimizer.param_groups:
            group["lr"] = ctx.cfg.lr / 2 ** Hidden.count[0]


@pytest.fixture
def registered(monkeypatch):
    for cls in (Unclipped, Counting, Hidden):
        monkeypatch.setitem(MECHANISMS._entries, cls.name, Entry(cls.name, cls, {"plugin": "tests"}))


def test_an_unclipped_mechanism_fails_on_its_contribution(registered):
    res = CliRunner().invoke(app, ["check", "unclipped"])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("FAIL contribution") and "more than accounted" in lines[0]
    assert "fails the conformance check: contribution" in res.output


def test_state_kept_on_the_mechanism_is_checkpointed_without_declaring_it(registered):
    assert all(p.ok for p in run_checks("counting"))


def test_state_hidden_outside_the_mechanism_fails_the_resume_property(registered):
    results = {p.name: p for p in run_checks("hidden")}
    assert results["contribution"].ok and results["noise"].ok
    assert not results["resume"].ok and "state_dict" in results["resume"].detail


def test_nonprivate_exits_0_and_says_it_is_not_private():
    res = CliRunner().invoke(app, ["check", "nonprivate"])
    assert res.exit_code == 0 and "not private" in res.output


def test_a_bad_name_or_parameter_is_bad_input():
    assert CliRunner().invoke(app, ["check", "dpsdg"]).exit_code == 2
    res = CliRunner().invoke(app, ["check", "auto_s", "--set", "gamma=-1"])
    assert res.exit_code == 2 and "gamma" in res.output
    res = CliRunner().invoke(app, ["check", "dpsgd", "--grad-sample", "opacus"])
    assert res.exit_code == 2 and "--grad-sample 'opacus'" in res.output


class Underdeclared(DPSGD):
    """Halves its noise and claims so in ``noise_std``, under DP-SGD's (sampled-Gaussian) accountant."""

    name = "underdeclared"

    def noise(self, summed, release):  # noqa: ANN001
        std = 0.5 * release.noise_multiplier * self.sensitivity(release.max_grad_norm)
        return [s + release.gaussian(std, s) for s in summed]

    def noise_std(self, noise_multiplier, clip):  # noqa: ANN001
        return 0.5 * noise_multiplier * self.sensitivity(clip)


def test_a_noise_std_that_agrees_with_too_little_noise_does_not_fool_the_check(monkeypatch):
    monkeypatch.setitem(MECHANISMS._entries, "underdeclared", Entry("underdeclared", Underdeclared, {"plugin": "tests"}))
    noise = {p.name: p for p in run_checks("underdeclared")}["noise"]
    assert not noise.ok and "0.50" in noise.detail


class MisstatedRelease(DPSGD):
    """Accounts RDP at twice the sampling rate but states the release at the plain rate to PLD and PRV."""

    name = "misstated"

    def rdp(self, noise_multiplier, q, steps):  # noqa: ANN001
        return super().rdp(noise_multiplier, min(1.0, 2 * q), steps)

    def sampled_gaussians(self, noise_multiplier, q, steps):  # noqa: ANN001
        return super().sampled_gaussians(noise_multiplier, q, steps)


def test_a_release_that_differs_from_the_rdp_curve_fails_the_accounting_check():
    assert check_accounting_of(MisstatedRelease).ok is False
    assert "another mechanism" in check_accounting_of(MisstatedRelease).detail
    assert check_accounting_of(DPSGD).ok


def check_accounting_of(cls):  # noqa: ANN001, ANN201
    from dpbench.conformance import check_accounting

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(MECHANISMS._entries, cls.name, Entry(cls.name, cls, {"plugin": "tests"}))
        return check_accounting(cls.name, {})
