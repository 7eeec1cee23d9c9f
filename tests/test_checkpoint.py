"""A run killed mid-way and resumed from its checkpoint ends exactly where a straight run ends."""

from __future__ import annotations

import dataclasses

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


@pytest.mark.parametrize("mech_name", ["dpsgd", "nonprivate"])
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
