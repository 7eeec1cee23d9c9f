"""One logical training step: a sampled batch split into physical chunks, empty batches included.

The private step runs every chunk's forward and backward (the per-sample path keeps what it needs) and
lets the mechanism's optimizer transform and accumulate them; only the last chunk's ``step`` releases
the noisy sum and updates. An empty Poisson batch still releases noise and counts as a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dpbench.data.base import TrainTransform


def average_augmentations(params: list[torch.Tensor], copies: int) -> None:
    """Per-sample gradients of K adjacent augmented copies -> their mean, one row per example.

    Done before clipping, so every example still contributes exactly one per-sample gradient and
    the privacy analysis is that of the un-augmented run (De et al. 2022).
    """
    for p in params:
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is not None:
            p.grad_sample = grad_sample.view(-1, copies, *grad_sample.shape[1:]).mean(1)


@dataclass
class Batches:
    """The training split on the device, and how a sampled batch becomes physical chunks of inputs."""

    x: torch.Tensor
    y: torch.Tensor
    physical: int
    augment: TrainTransform | None = None
    copies: int = 1
    augmenter: torch.Generator | None = None

    def chunks(self, indices: torch.Tensor) -> list[torch.Tensor]:
        return list(indices.split(self.physical)) if len(indices) else []

    def inputs(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's inputs and labels; with augmentation, K augmented copies of each example, adjacent."""
        if self.augment is None:
            return self.x[chunk], self.y[chunk]
        return (self.augment(self.x[chunk].repeat_interleave(self.copies, 0), self.augmenter),
                self.y[chunk].repeat_interleave(self.copies))


def private_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, batches: Batches,
                 indices: torch.Tensor) -> float | torch.Tensor:
    """One noisy release and update; returns the sum of the chunks' mean losses times their sizes (on the device:
    reading it would make the host wait for the step)."""
    chunks = batches.chunks(indices)
    if not chunks:  # an empty Poisson batch still releases noise and counts as a step
        optimizer.expect_empty_chunk()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return 0.0
    total: float | torch.Tensor = 0.0
    for j, chunk in enumerate(chunks):
        xc, yc = batches.inputs(chunk)
        loss = criterion(model(xc), yc)
        loss.backward()
        if batches.copies > 1:
            average_augmentations(optimizer.params, batches.copies)
        total = total + loss.detach() * len(chunk)
        if j < len(chunks) - 1:  # accumulate: only the last chunk releases and updates
            optimizer.signal_skip_step(do_skip=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total


def nonprivate_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, indices: torch.Tensor,
                    batch_size: int) -> float | torch.Tensor:
    """One plain update, scaled as the private path scales (sum of losses over the expected batch size)."""
    optimizer.zero_grad(set_to_none=True)
    total: float | torch.Tensor = 0.0
    for chunk in batches.chunks(indices):
        xc, yc = batches.inputs(chunk)
        loss = nn.functional.cross_entropy(model(xc), yc, reduction="sum") / (batch_size * batches.copies)
        loss.backward()
        total = total + loss.detach() * batch_size
    optimizer.step()
    return total
