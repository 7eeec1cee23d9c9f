"""The eps = inf control: the same loop and sampler, with no clipping and no noise."""

from __future__ import annotations

import torch

from dpbench.mechanisms import MECHANISMS
from dpbench.mechanisms.base import Mechanism


@MECHANISMS.register("nonprivate")
class NonPrivate(Mechanism):
    name = "nonprivate"
    summary = "non-private SGD, the eps = inf control (same sampler and loop)"
    accountant = "none"
    private = False
    prv_applies = False

    def make_optimizer(self, optimizer: torch.optim.Optimizer, **_: object) -> torch.optim.Optimizer:
        return optimizer
