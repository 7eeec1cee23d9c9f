"""Periodic checkpoints of a run, so a killed run (or sweep) continues instead of starting over.

In reproducible mode a checkpoint holds everything a straight run would carry forward (model,
optimizer, step, every generator, the mechanism's own state), so ``--resume`` ends at exactly the
result of an uninterrupted run. In ``--secure`` mode generator states are secret and never written;
a resumed secure run continues from fresh OS entropy. Secure and reproducible runs of one
configuration keep separate checkpoints, and each checkpoint records which kind wrote it: a secure
run that continued a reproducible run's checkpoint would carry on its seed-derived randomness.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from dpbench.errors import BadInput
from dpbench.storage import save_torch_atomic


class Checkpointer:
    def __init__(self, path: str | Path, every_s: float = 300.0, secure: bool = False) -> None:
        self.path = Path(path)
        self.every_s = every_s
        self.secure = secure
        self._last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None; a BadInput when it was written by the other kind of run."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 (torch raises many kinds on a damaged file)
            raise BadInput(f"checkpoint {self.path} cannot be read ({type(exc).__name__}: {exc}); delete it "
                           f"to start this run afresh") from None
        written_secure = bool(state.get("secure", False))
        if written_secure != self.secure:
            kind = "a --secure run" if written_secure else "a reproducible (non --secure) run"
            raise BadInput(f"checkpoint {self.path} was written by {kind}; a {'--secure' if self.secure else 'reproducible'} "
                           f"run never continues it (delete it, or run without --resume)")
        if self.secure:  # never restore generator state in a secure run, whatever the file holds
            state.pop("generators", None)
            state.pop("torch_rng", None)
        return state

    def maybe_save(self, state_fn: Callable[[], dict[str, Any]]) -> bool:
        """Save if ``every_s`` seconds have passed since the last save."""
        if time.monotonic() - self._last < self.every_s:
            return False
        state = state_fn()
        state["secure"] = self.secure
        if self.secure:
            state.pop("generators", None)
            state.pop("torch_rng", None)
        save_torch_atomic(self.path, state)
        self._last = time.monotonic()
        return True

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def checkpoint_path(out_csv: str | Path, config_hash: str, seed: int, secure: bool = False,
                    folder: str | Path | None = None) -> Path:
    """``<folder>/<config_hash>-seed<seed>[-secure].pt``: one per configuration, seed and mode. ``folder``
    defaults to ``<csv folder>/checkpoints`` (a Ray sweep names shared storage instead)."""
    folder = Path(folder) if folder is not None else Path(out_csv).parent / "checkpoints"
    return folder / f"{config_hash}-seed{seed}{'-secure' if secure else ''}.pt"
