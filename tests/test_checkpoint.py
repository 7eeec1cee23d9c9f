"""A run killed mid-way and resumed from its checkpoint ends exactly where a straight run ends."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dpbench.checkpoint import Checkpointer
from dpbench.config import resolve
from dpbench.data import load_dataset
from dpbench.engine import train
from dpbench.mechanisms import get_mechanism

DATA = load_dataset("synthetic")


class Killed(Exception):
    pass


def cfg(**kw):
    base = resolve({"mech": "dpsgd", "dataset": "synthetic", "eps": 3.0, "steps": 8})
    return dataclasses.replace(base, **kw)


def final_params(c, mech, checkpointer=None, resume=False):
    out = train(c, mech, DATA, 1.1 if mech.private else 0.0, 8, torch.device("cpu"), show_progress=False,
                checkpointer=checkpointer, resume=resume)
    return torch.cat([p.detach().flatten() for p in out.model.parameters()]), out


@pytest.mark.parametrize("mech_name", ["dpsgd", "nonprivate", "psasc"])  # psasc: its EMA is mechanism state
def test_resume_after_a_kill_matches_a_straight_run(tmp_path, mech_name):
    c = cfg(mech=mech_name)
    straight, straight_out = final_params(c, get_mechanism(mech_name)())

    class DiesAtStep5(get_mechanism(mech_name)):
        def begin_step(self, ctx, step):
            if step == 5:
                raise Killed
            super().begin_step(ctx, step)

    ck = Checkpointer(tmp_path / "ck.pt", every_s=0.0)
    with pytest.raises(Killed):
        final_params(c, DiesAtStep5(), checkpointer=ck)
    assert ck.load()["step"] == 5
    resumed, resumed_out = final_params(c, get_mechanism(mech_name)(), checkpointer=ck, resume=True)
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)
    assert resumed_out.samples_seen == straight_out.samples_seen


def test_without_resume_the_checkpoint_is_ignored(tmp_path):
    c = cfg()
    ck = Checkpointer(tmp_path / "ck.pt", every_s=0.0)
    first, _ = final_params(c, get_mechanism("dpsgd")(), checkpointer=ck)
    again, _ = final_params(c, get_mechanism("dpsgd")(), checkpointer=ck, resume=False)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_secure_checkpoints_hold_no_generator_state(tmp_path):
    ck = Checkpointer(tmp_path / "ck.pt", every_s=0.0, secure=True)
    final_params(cfg(secure=True), get_mechanism("dpsgd")(), checkpointer=ck)
    state = ck.load()
    assert state is not None and "generators" not in state and "torch_rng" not in state


def _kill_after_first_checkpoint(monkeypatch):
    real = Checkpointer.maybe_save

    def save_then_die(self, state_fn):
        if real(self, state_fn):
            raise Killed
        return False

    monkeypatch.setattr(Checkpointer, "maybe_save", save_then_die)


def test_a_secure_resume_never_continues_a_reproducible_runs_checkpoint(tmp_path, monkeypatch, capsys):
    from dpbench.engine import run

    out = str(tmp_path / "runs.csv")
    c = cfg(out=out, steps=6)
    straight = run(c, show_progress=False)  # the reproducible run, uninterrupted
    _kill_after_first_checkpoint(monkeypatch)
    with pytest.raises(Killed):
        run(c, show_progress=False, checkpoint_every_s=0.0)
    (left,) = (tmp_path / "checkpoints").glob("*.pt")
    assert not left.name.endswith("-secure.pt") and torch.load(left, weights_only=False)["step"] == 1
    monkeypatch.undo()
    # today the secure run restored that checkpoint's seed-derived generators and ended bit for bit on the
    # reproducible run's weights (same test_loss to the last digit), while its row said secure=true
    secure = run(dataclasses.replace(c, secure=True), show_progress=False, resume=True)
    assert secure["secure"] is True and secure["steps"] == 6
    assert secure["test_loss"] != straight["test_loss"]
    assert "starts afresh" in capsys.readouterr().err
    assert left.exists()  # the reproducible run can still continue its own checkpoint
    resumed = run(c, show_progress=False, resume=True)
    assert resumed["test_loss"] == straight["test_loss"]


def test_checkpoints_are_keyed_on_secure_but_the_config_hash_is_not():
    from dpbench.checkpoint import checkpoint_path

    c = cfg()
    assert c.hash("synthetic") == dataclasses.replace(c, secure=True).hash("synthetic")
    plain, secure = checkpoint_path("r/runs.csv", "h", 0), checkpoint_path("r/runs.csv", "h", 0, secure=True)
    assert plain != secure and plain.parent == secure.parent == Path("r/checkpoints")


def test_a_checkpoint_of_the_other_kind_of_run_is_refused(tmp_path):
    from dpbench.errors import BadInput

    path = tmp_path / "ck.pt"
    final_params(cfg(), get_mechanism("dpsgd")(), checkpointer=_dying_checkpointer(path, secure=False))
    with pytest.raises(BadInput, match="written by a reproducible .* a --secure run never continues it"):
        Checkpointer(path, secure=True).load()
    final_params(cfg(secure=True), get_mechanism("dpsgd")(), checkpointer=_dying_checkpointer(path, secure=True))
    with pytest.raises(BadInput, match="written by a --secure run"):
        Checkpointer(path, secure=False).load()


def _dying_checkpointer(path, secure):
    """A checkpointer that saves at every step and keeps its file (as a killed run leaves it)."""
    ck = Checkpointer(path, every_s=0.0, secure=secure)
    ck.clear = lambda: None
    return ck


def test_a_secure_run_restores_no_generator_even_from_a_file_that_holds_them(tmp_path):
    path = tmp_path / "ck.pt"
    final_params(cfg(secure=True), get_mechanism("dpsgd")(), checkpointer=_dying_checkpointer(path, secure=True))
    state = torch.load(path, weights_only=False)
    state["generators"] = {"noise": torch.Generator().manual_seed(0).get_state()}
    state["torch_rng"] = torch.get_rng_state()
    torch.save(state, path)
    assert "generators" not in Checkpointer(path, secure=True).load()


def test_secure_mode_draws_opacus_hardened_noise():
    seen = []
    train(cfg(secure=True), get_mechanism("dpsgd")(), DATA, 1.1, 2, torch.device("cpu"), show_progress=False,
          on_optimizer=lambda opt: seen.append(opt.secure_mode))
    train(cfg(), get_mechanism("dpsgd")(), DATA, 1.1, 2, torch.device("cpu"), show_progress=False,
          on_optimizer=lambda opt: seen.append(opt.secure_mode))
    assert seen == [True, False]
