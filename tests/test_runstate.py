"""The run's moving average of the loss: the same from device tensors as from numbers, read only on demand."""

from __future__ import annotations

import math

import torch

from dpbench.runstate import RunState


def _ema(losses, as_tensor: bool) -> RunState:
    state = RunState(0, False, torch.device("cpu"))
    for batch, total in losses:
        state.record(batch, torch.tensor(total) if as_tensor else total)
    return state


def test_tensor_losses_give_the_moving_average_of_numbers():
    losses = [(4, 8.0), (0, 0.0), (2, 3.0), (5, 1.0)]
    numbers, tensors = _ema(losses, False), _ema(losses, True)
    assert isinstance(tensors.ema, torch.Tensor)  # kept where it was computed until someone reads it
    assert math.isclose(tensors.ema_loss, numbers.ema_loss, rel_tol=1e-6)
    assert math.isclose(numbers.ema_loss, 0.95 * (0.95 * 2.0 + 0.05 * 1.5) + 0.05 * 0.2)
    assert tensors.step == 4 and tensors.samples == 11


def test_a_nan_average_restarts_from_the_next_loss_on_both_kinds():
    for as_tensor in (False, True):
        state = _ema([(1, float("nan")), (1, 3.0)], as_tensor)
        assert state.ema_loss == 3.0
