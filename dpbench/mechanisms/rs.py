"""Random sparsification (RS): Zhu & Blaschko, "Improving Differentially Private SGD via Randomly
Sparsified Gradients", TMLR 2023 (arXiv 2112.00845).

One global mask over the flattened parameter vector drops exactly ``floor(p d)`` coordinates, chosen
uniformly without replacement. The same mask applies to every sample and every step until it is
redrawn: once per epoch by default (``--set refresh=R`` for R draws per epoch). The dropped fraction
``p`` rises linearly from 0 in the first chunk to ``p_final`` in the last ("gradual cooling"). In a step
each per-sample gradient is masked, *then* clipped on its masked norm; Gaussian noise goes only on the
kept coordinates; kept coordinates are not rescaled (the bias toward zero is the method).

With SGD momentum (or Adam), the optimizer's buffer still moves dropped coordinates, as in the official
code; ``--set mask_momentum=true`` zeroes the buffer there at every step, so dropped coordinates stay put.

Privacy: the mask comes from its own generator and depends on no data, so given the mask a step is
DP-SGD's sampled Gaussian on ``sum_i clip(m * g_i)`` with sensitivity C; the dropped coordinates of that
sum are zero on every dataset, and releasing them without noise leaks nothing. eps is DP-SGD's for the
same (sigma, q, steps).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dpbench.errors import BadInput
from dpbench.mechanisms import MECHANISMS
from dpbench.mechanisms.base import DPBenchOptimizer, Mechanism, Param, TuneRange, TrainContext
from dpbench.recipes import Recipe


def mask_chunks(steps: int, steps_per_epoch: int, refresh: int) -> int:
    """How many masks a run of ``steps`` steps draws: ``refresh`` per (nominal) epoch, at least one."""
    return max(1, round(steps * refresh / steps_per_epoch))


def chunk_of_step(step: int, steps: int, chunks: int) -> int:
    """Mask chunk of a step; chunks are contiguous and as equal in length as the step count allows."""
    return min(step * chunks // max(steps, 1), chunks - 1)


def drop_rate(chunk: int, chunks: int, p_final: float) -> float:
    """``p_final * k / (K - 1)``: 0 in the first chunk, ``p_final`` in the last.

    A run with a single chunk (the official code divides by zero there) drops ``p_final`` throughout,
    so that the name "final rate" keeps its meaning.
    """
    if chunks <= 1:
        return p_final
    return min(p_final, max(0.0, p_final * chunk / (chunks - 1)))


def draw_keep_mask(shapes: list[torch.Size], rate: float, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Per-parameter 0/1 keep masks from ONE global permutation: exactly ``floor(rate d)`` zeros overall."""
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    keep = torch.ones(total, dtype=dtype, device=generator.device)
    dropped = math.floor(rate * total)
    if dropped > 0:
        keep[torch.randperm(total, generator=generator, device=generator.device)[:dropped]] = 0
    return [part.view(shape) for part, shape in zip(keep.split(sizes), shapes)]


@MECHANISMS.register("rs")
class RandomSparsification(Mechanism):
    """RS (Zhu & Blaschko, TMLR 2023): DP-SGD on a random, data-independent, gradually growing sparse support."""

    name = "rs"
    summary = "Random sparsification (Zhu & Blaschko 2023): shared random mask, clip on the masked norm"
    #: The parameters, for the mask's shapes; the model's own, so never copied into a checkpoint.
    transient = ("_params",)
    recipes = {
        # The T&B DP-SGD rows unchanged (C 0.1, momentum 0.9, as the official README's refresh run; the buffer
        # is not masked, as in the official code), so that rs against dpsgd isolates the sparsification;
        # p_final 0.9 and one mask per epoch are the defaults.
        "mnist": Recipe("cnn_tanh", 512, 40, 0.5, "sgd", 0.9, 0.1,
                      "T&B 2021 MNIST DP-SGD row; RS p_final 0.9, refresh 1 (Zhu & Blaschko 2023)"),
        "fmnist": Recipe("cnn_tanh", 2048, 40, 4.0, "sgd", 0.9, 0.1,
                      "T&B 2021 FMNIST DP-SGD row; RS p_final 0.9, refresh 1 (Zhu & Blaschko 2023)"),
    }
    param_specs = (
        Param("p_final", float, 0.9, "fraction of coordinates dropped in the last chunk (0 in the first)",
              tune=TuneRange(0.3, 0.95, log=False)),
        Param("refresh", int, 1, "mask draws per epoch"),
        Param("mask_momentum", bool, False, "zero the optimizer's momentum on dropped coordinates"),
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if not 0.0 <= self.params["p_final"] < 1.0:
            raise BadInput(f"--set p_final={self.params['p_final']}: must be in [0, 1)")
        if self.params["refresh"] < 1:
            raise BadInput(f"--set refresh={self.params['refresh']}: must be >= 1")
        self._generator: torch.Generator | None = None
        self._params: list[torch.Tensor] = []
        self._chunks = 1
        self._chunk: int | None = None
        #: One keep-mask per parameter (1 kept, 0 dropped), or None before the first draw. Not secret: the
        #: dropped coordinates are exact zeros in every update, so it is kept in --secure checkpoints too.
        self.keep_masks: list[torch.Tensor] | None = None
        #: (step, drop rate, dropped count) at every redraw, for reports and tests.
        self.mask_history: list[tuple[int, float, int]] = []

    def setup(self, ctx: TrainContext) -> None:
        # Its own generator, derived from the seed only: the mask must never depend on the data.
        self._generator = ctx.make_generator("rs-mask")
        self._params = list(ctx.optimizer.params)
        steps_per_epoch = max(1, round(1.0 / ctx.sample_rate))
        self._chunks = mask_chunks(ctx.steps, steps_per_epoch, self.params["refresh"])
        self._chunk = None
        self.keep_masks = None
        self.mask_history = []

    def set_drop_rate(self, rate: float, params: list[torch.Tensor], generator: torch.Generator) -> int:
        """Redraw the mask over ``params`` at this dropped fraction; returns the number of dropped coordinates."""
        masks = draw_keep_mask([p.shape for p in params], rate, generator)
        self.keep_masks = [m.to(device=p.device, dtype=p.dtype) for m, p in zip(masks, params)]
        return sum(int((m == 0).sum()) for m in self.keep_masks)

    def begin_step(self, ctx: TrainContext, step: int) -> None:
        chunk = chunk_of_step(step, ctx.steps, self._chunks)
        if chunk != self._chunk:  # a resumed run keeps the mask in force (it is in the checkpoint)
            rate = drop_rate(chunk, self._chunks, self.params["p_final"])
            dropped = self.set_drop_rate(rate, self._params, self._generator)
            self.mask_history.append((step, rate, dropped))
            self._chunk = chunk

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.keep_masks is not None:  # checkpoints load on the CPU
            self.keep_masks = [m.to(device=p.device, dtype=p.dtype) for m, p in zip(self.keep_masks, self._params)]

    # Masking first means the clip factor uses the norm of the sparsified gradient (spec 4.1).
    def coordinate_masks(self) -> list[torch.Tensor] | None:
        if self.mask_history and self.mask_history[-1][2] == 0:
            return None  # a mask that drops nothing is no mask: the step is DP-SGD's, bit for bit
        return self.keep_masks

    def noise(self, summed: list[torch.Tensor], release: DPBenchOptimizer) -> list[torch.Tensor]:
        # Full-size noise keeps the random stream identical to DP-SGD's; zeroing it on the dropped
        # coordinates is "noise only on kept coordinates". The sum (and any canary) is already zero there
        # for a real record, so masking the whole release changes nothing else.
        released = super().noise(summed, release)
        if self.keep_masks is not None:
            for r, keep in zip(released, self.keep_masks):
                r.mul_(keep.view_as(r))
        return released

    def update(self, released: list[torch.Tensor], release: DPBenchOptimizer) -> None:
        release.mean_of(released)
        if self.params["mask_momentum"] and self.keep_masks is not None:
            # Acts on buffers of already privatised gradients: post-processing, eps unchanged.
            for p, keep in zip(release.params, self.keep_masks):
                state = release.original_optimizer.state.get(p, {})
                for key in ("momentum_buffer", "exp_avg"):  # SGD's, Adam's first moment
                    if state.get(key) is not None:
                        state[key].mul_(keep)
        release.original_optimizer.step()

    def canary_contribution(self, direction: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
        """Worst case under the mask in force: the direction's kept part, scaled to norm C.

        A real record can only move kept coordinates, so the worst case lives there; if the direction
        has nothing on them the record cannot influence this release at all.
        """
        if self.keep_masks is not None:
            direction = [d * m.to(d) for d, m in zip(direction, self.keep_masks)]
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in direction))
        if norm == 0.0:
            return [torch.zeros_like(d) for d in direction]
        return [d * (clip / norm) for d in direction]
