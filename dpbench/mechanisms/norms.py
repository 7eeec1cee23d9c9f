"""Per-sample gradient norms that stay exact where float32 squares underflow.

A mechanism that divides by a norm (DPIS's ``K^ / (B n_i)``, the scaling family's ``C / (n_i + gamma)``)
would scale a tiny gradient far beyond its sensitivity if that norm came out too small, so both use these.
"""

from __future__ import annotations

import torch

#: Per-parameter norms below this are recomputed in float64 (float32 squares underflow near 1e-19).
TINY_NORM = 1e-10


def per_sample_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """Global per-sample gradient norms (over all parameters), in float64.

    Computed in the gradients' dtype, as Opacus does, except rows too small or not finite there: a float32
    norm of a nonzero gradient of size 1e-25 is 0, and a weight like C/(x + gamma) with a tiny gamma would
    then scale that gradient far beyond C. Redoing only those rows keeps the memory of Opacus' clipping.
    """
    device = grad_samples[0].device
    flat = [g.flatten(1) for g in grad_samples]  # flatten, not reshape(-1): a chunk may hold no rows
    norms = torch.stack([g.norm(2, dim=-1).to(device, torch.float64) for g in flat], dim=1)
    redo = ~(norms >= TINY_NORM) | ~torch.isfinite(norms)
    if bool(redo.any()):
        for j, g in enumerate(flat):
            rows = redo[:, j]
            if bool(rows.any()):
                norms[rows, j] = g[rows.to(g.device)].to(torch.float64).norm(2, dim=-1).to(device)
    return norms.norm(2, dim=1)
