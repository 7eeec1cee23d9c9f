"""Canaries of the one-run audit and the hook that inserts gradient canaries into a step.

White-box (gradient) canaries. Canary i is a fixed random unit direction ``u_i`` over all trainable
parameters, regenerated on demand from its own seed (so nothing of size m x d is ever held). An
included canary behaves like one more record of the data set: it enters each step independently
with probability ``mech.sample_rate(q)`` (the rate at which the accountant lets the differing record
enter the gradient release: q for DP-SGD, q_cap for DPIS), and when it enters it adds
``mech.canary_contribution(u_i, C)`` (the accountant's worst-case record: norm C for DP-SGD, p
coordinates of C/sqrt(p) for ModelMix, norm K^/B for DPIS, ...) to the summed gradient *before*
the noise, through ``DPBenchOptimizer.canary``. Its score is the inner product of the total model
update with its (normalised) contribution direction, sign flipped so that higher = more likely in.

Black-box (input) canaries. m training records with their labels changed to a different class; the
included ones are trained on like any other record; the score is minus the final model's loss on them.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from dpbench.mechanisms.base import Mechanism

SeedFn = Callable[[str], int]

#: Directions are kept in memory while m x d float32 values fit in this many bytes, else regenerated.
DIRECTION_CACHE_BYTES = 512 * 2**20


def canary_direction(seed_of: SeedFn, index: int, shapes: list[torch.Size], device: torch.device) -> list[torch.Tensor]:
    """Unit-norm Gaussian direction of canary ``index``, split per parameter; the same on every call."""
    g = torch.Generator().manual_seed(seed_of(f"audit-canary-direction/{index}"))
    sizes = [math.prod(s) for s in shapes]
    flat = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
    flat /= flat.norm()
    return [part.view(s).to(device=device, dtype=torch.float32) for part, s in zip(flat.split(sizes), shapes)]


def draw_membership(seed_of: SeedFn, m: int) -> np.ndarray:
    """The secret S: each canary in with probability 1/2, independently."""
    return np.random.default_rng(seed_of("audit-membership")).random(m) < 0.5


class GradientCanaries:
    """Inserts the included gradient canaries into each logical step of a private or non-private run."""

    def __init__(self, mech: Mechanism, included: np.ndarray, rate: float, clip: float, batch_size: int,
                 seed_of: SeedFn) -> None:
        self.mech = mech
        self.included = np.asarray(included, dtype=bool)
        self.rate = rate
        self.clip = clip
        self.batch_size = batch_size
        self.seed_of = seed_of
        self.generator = np.random.default_rng(seed_of("audit-canary-sampling"))
        self.params: list[torch.Tensor] = []
        self.initial: list[torch.Tensor] = []
        #: Times each canary entered a step (0 for excluded ones), for diagnostics and tests.
        self.entered = np.zeros(len(self.included), dtype=np.int64)
        self.steps_seen = 0
        self._cache: dict[int, list[torch.Tensor]] | None = None

    def direction(self, index: int) -> list[torch.Tensor]:
        """Canary ``index``'s unit direction over the attached parameters (cached when they fit)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        d = canary_direction(self.seed_of, index, self.shapes, self.params[0].device)
        if self._cache is not None:
            self._cache[index] = d
        return d

    @property
    def shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """``on_optimizer`` callback: remember the parameters and their initial values, install the hook."""
        if hasattr(optimizer, "canary") and hasattr(optimizer, "add_noise"):
            self.params = list(optimizer.params)
            optimizer.canary = self.contribution
        elif self.mech.private:
            raise TypeError(f"mechanism {self.mech.name!r} does not use a DPBenchOptimizer: its steps cannot take a canary")
        else:
            # Non-private: no noise step to hook. The loop's loss is sum/B, so a record's gradient enters p.grad / B.
            self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            step = optimizer.step

            def step_with_canaries(*args, **kwargs):  # noqa: ANN002, ANN003
                extra = self.contribution()
                if extra is not None:
                    for p, c in zip(self.params, extra):
                        add = c.to(p) / self.batch_size
                        p.grad = add.clone() if p.grad is None else p.grad + add
                return step(*args, **kwargs)

            optimizer.step = step_with_canaries
        self.initial = [p.detach().clone() for p in self.params]
        size = sum(p.numel() for p in self.params) * 4 * len(self.included)
        self._cache = {} if size <= DIRECTION_CACHE_BYTES else None

    def contribution(self) -> list[torch.Tensor] | None:
        """This step's canary sum: every included canary enters independently at the accountant's rate."""
        self.steps_seen += 1
        # drawn for all m canaries, so the sampling stream does not depend on S
        enters = (self.generator.random(len(self.included)) < self.rate) & self.included
        chosen = np.nonzero(enters)[0]
        if len(chosen) == 0:
            return None
        self.entered[chosen] += 1
        device = self.params[0].device
        total = [torch.zeros(s, device=device) for s in self.shapes]
        for i in chosen:
            piece = self.mech.canary_contribution(self.direction(int(i)), self.clip)
            for t, c in zip(total, piece):
                t.add_(c.to(t))
        return total

    @torch.no_grad()
    def scores(self, reference: Mechanism) -> np.ndarray:
        """``-<theta_T - theta_0, c_i / ||c_i||>`` per canary, ``c_i`` its contribution under ``reference``.

        ``reference`` is a fresh, never set-up instance of the mechanism, so the scoring direction does
        not depend on the run's state (RS's last mask, DPIS's last K^): only its shape (ModelMix's p
        coordinates) is taken from the mechanism.
        """
        delta = torch.cat([(p.detach() - p0).reshape(-1).double() for p, p0 in zip(self.params, self.initial)])
        out = np.empty(len(self.included))
        for i in range(len(self.included)):
            c = reference.canary_contribution(self.direction(i), 1.0)
            flat = torch.cat([t.reshape(-1).double() for t in c])
            norm = float(flat.norm())
            out[i] = -float(delta @ flat) / norm if norm > 0 else 0.0
        return out


def flip_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Each label moved to a uniformly random *other* class."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes
