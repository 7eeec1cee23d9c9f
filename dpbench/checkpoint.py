"""Periodic checkpoints of a run, so a killed run (or sweep) continues instead of starting over.

In reproducible mode a checkpoint holds everything a straight run would carry forward (model,
optimizer, step, every generator, the mechanism's own state), so ``--resume`` ends at exactly the
result of an uninterrupted run. In ``--secure`` mode generator states are secret and never written;
a resumed secure run continues from fresh OS entropy.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch


class Checkpointer:
    def __init__(self, path: str | Path, every_s: float = 300.0, secure: bool = False) -> None:
        self.path = Path(path)
        self.every_s = every_s
        self.secure = secure
        self._last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def maybe_save(self, state_fn: Callable[[], dict[str, Any]]) -> bool:
        """Save if ``every_s`` seconds have passed since the last save."""
        if time.monotonic() - self._last < self.every_s:
            return False
        state = state_fn()
        if self.secure:
            state.pop("generators", None)
            state.pop("torch_rng", None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self._last = time.monotonic()
        return True

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def checkpoint_path(out_csv: str | Path, config_hash: str, seed: int) -> Path:
    """``<csv folder>/checkpoints/<config_hash>-seed<seed>.pt``: one per configuration and seed."""
    return Path(out_csv).parent / "checkpoints" / f"{config_hash}-seed{seed}.pt"
