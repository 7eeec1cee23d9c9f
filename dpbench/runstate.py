"""The state of one run: seeding, its generators, and what a checkpoint saves and restores.

In reproducible mode every generator derives from ``--seed`` and a checkpoint carries all of them, so a
resumed run ends exactly where a straight run ends. In ``--secure`` mode generators are seeded from OS
entropy, never written and never restored.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from dpbench.checkpoint import Checkpointer


def derive_seed(seed: int, purpose: str) -> int:
    """Independent, reproducible seeds for model init, sampling, noise, ... from one --seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8], "little") >> 1


def make_generator(seed: int, purpose: str, device: torch.device, secure: bool) -> torch.Generator:
    """A generator for one purpose; in secure mode seeded from OS entropy and never recorded."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63) if secure else derive_seed(seed, purpose))
    return g


@dataclass
class RunState:
    """Generators by purpose and the counters a resumed run continues from."""

    seed: int
    secure: bool
    device: torch.device
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    step: int = 0  # logical steps done
    samples: int = 0  # records trained on
    #: Moving average of the training loss; a tensor on the device while training, so steps need not wait for it.
    ema: float | torch.Tensor = float("nan")
    wall: float = 0.0  # training seconds before this process

    @property
    def ema_loss(self) -> float:
        """The moving average as a number (waits for the device)."""
        return float(self.ema)

    def seed_model_init(self) -> None:
        """torch's global generator for the model's initial weights (derived from --seed in every mode)."""
        torch.manual_seed(derive_seed(self.seed, "model"))

    def after_model_init(self) -> None:
        if self.secure:  # the initial weights may follow --seed; nothing drawn from here on may
            torch.manual_seed(secrets.randbits(63))

    def generator(self, purpose: str, on: torch.device | None = None) -> torch.Generator:
        """A new generator for ``purpose`` (each purpose once), saved in reproducible checkpoints."""
        if purpose in self.generators:
            raise ValueError(f"generator {purpose!r} requested twice")
        self.generators[purpose] = make_generator(self.seed, purpose, on or self.device, self.secure)
        return self.generators[purpose]

    def record(self, batch: int, loss_sum: float | torch.Tensor) -> None:
        """Count one finished step of ``batch`` records whose losses sum to ``loss_sum`` (a number or a tensor)."""
        self.step += 1
        self.samples += batch
        if not batch:
            return
        mean = loss_sum / batch
        if isinstance(mean, torch.Tensor):
            mean = mean.double()  # device tensor arithmetic only: nothing here waits for the device
        if isinstance(self.ema, torch.Tensor):
            mean = mean if isinstance(mean, torch.Tensor) else torch.full_like(self.ema, mean)
            self.ema = torch.where(torch.isnan(self.ema), mean, 0.95 * self.ema + 0.05 * mean)
        else:
            self.ema = mean if math.isnan(self.ema) else 0.95 * self.ema + 0.05 * mean

    def restore(self, checkpointer: Checkpointer, model: nn.Module, optimizer: torch.optim.Optimizer,
                mech: Any) -> bool:
        """Continue from the checkpoint, if there is one; False when there is none."""
        state = checkpointer.load()
        if state is None:
            return False
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        mech.load_state_dict(state["mechanism"])
        if not self.secure:  # a secure run keeps its fresh OS-seeded generators (the checkpoint holds none)
            for purpose, g_state in state.get("generators", {}).items():
                self.generators[purpose].set_state(g_state)
            if "torch_rng" in state:
                torch.set_rng_state(state["torch_rng"])
        self.step, self.samples, self.ema, self.wall = state["step"], state["samples"], state["ema_loss"], state["wall"]
        return True

    def snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer, mech: Any, wall: float) -> dict[str, Any]:
        """What a checkpoint holds after ``self.step`` steps (the checkpointer drops generators in secure mode)."""
        return {"step": self.step, "samples": self.samples, "ema_loss": self.ema_loss, "wall": wall,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "mechanism": mech.state_dict(),
                "generators": {k: g.get_state() for k, g in self.generators.items()}, "torch_rng": torch.get_rng_state()}
