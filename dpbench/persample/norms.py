"""Per-sample gradient norms and per-sample factors that keep every contribution within its bound.

A mechanism multiplies each sample's gradient ``g_i`` by a factor ``f_i`` (DP-SGD's ``min(1, C/x)``,
the scaling family's ``C / (x + gamma)``, DPIS's ``K^ / (B x)``) and its accountant assumes
``||f_i g_i|| <= bound``. In float32 that can fail three ways, all handled here:

- the norm: a float32 norm of a nonzero gradient of size 1e-25 is 0 (its squares underflow), and a
  float32 sum over millions of coordinates is off by up to ~1e-3 relative, so clipping to it can
  overshoot C. Norms here are float64 sums of float32 norms of blocks of at most ``NORM_BLOCK``
  coordinates (error at most 33 * 2^-24 relative, whatever the summation order), with rows that
  underflow redone in float64;
- the factor: casting a float64 factor to float32 rounds to nearest, which in the subnormal range is
  up to 2x (C = 1e-8 and a norm of 1.4e37 gave a contribution of 1.96 C). Factors here are capped at
  ``bound * (1 - FACTOR_MARGIN) / x`` and rounded toward zero;
- the product: ``f_i * g_ij`` rounds each coordinate by at most 2^-24 relative, which the margin covers.
"""

from __future__ import annotations

import torch

#: Per-parameter norms below this are recomputed in float64 (float32 squares underflow near 1e-19).
TINY_NORM = 1e-10

#: Coordinates per float32 partial norm: 64 rounded squares summed in float32 are within 64 * 2^-24 of
#: the exact sum in any order, so the block's norm is within 33 * 2^-24 (measured: below 1e-7).
NORM_BLOCK = 64

#: Relative head-room under the bound: covers the norm's error (33 * 2^-24) and the product's (2^-24).
FACTOR_MARGIN = 2.0 ** -18


def blockwise_norms(flat: torch.Tensor) -> torch.Tensor:
    """Row norms of ``flat`` (n x d) in float64, from float32 norms of blocks of ``NORM_BLOCK`` coordinates."""
    n, d = flat.shape
    full = d // NORM_BLOCK
    squares = torch.zeros(n, dtype=torch.float64, device=flat.device)
    if full:
        blocks = flat[:, :full * NORM_BLOCK].reshape(n, full, NORM_BLOCK)
        squares += torch.linalg.vector_norm(blocks, dim=2).to(torch.float64).pow(2).sum(1)
    if d > full * NORM_BLOCK:
        squares += torch.linalg.vector_norm(flat[:, full * NORM_BLOCK:], dim=1).to(torch.float64).pow(2)
    return squares.sqrt()


def per_sample_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """Global per-sample gradient norms (over all parameters), in float64, within 33 * 2^-24 relative."""
    return per_parameter_norms(grad_samples).norm(2, dim=1)


def per_parameter_norms(grad_samples: list[torch.Tensor], branch_free: bool | None = None) -> torch.Tensor:
    """Per-sample gradient norms of each parameter, ``[n, parameters]`` in float64, within 33 * 2^-24 relative.

    Rows too small or not finite in the gradients' dtype are redone in float64 (only those rows, which
    keeps the memory of Opacus' clipping): a float32 norm of a nonzero gradient of size 1e-25 is 0, and a
    weight like C/(x + gamma) with a tiny gamma would then scale that gradient far beyond C.
    """
    device = grad_samples[0].device
    flat = [g.flatten(1) for g in grad_samples]  # flatten, not reshape(-1): a chunk may hold no rows
    norms = torch.stack([blockwise_norms(g).to(device) for g in flat], dim=1)
    redo = ~(norms >= TINY_NORM) | ~torch.isfinite(norms)
    if device.type != "cpu" if branch_free is None else branch_free:
        # no branch on the data (the default off the CPU): a GPU would have to finish the step before the host decides
        for j, g in enumerate(flat):
            exact = torch.where(redo[:, j:j + 1], g, 0).to(torch.float64).norm(2, dim=-1)
            norms[:, j] = torch.where(redo[:, j], exact, norms[:, j])
        return norms
    if bool(redo.any()):
        for j, g in enumerate(flat):
            rows = redo[:, j]
            if bool(rows.any()):
                norms[rows, j] = g[rows.to(g.device)].to(torch.float64).norm(2, dim=-1).to(device)
    return norms


def round_toward_zero(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Non-negative float64 ``values`` in ``dtype``, never above the float64 value (overflow saturates)."""
    cast = values.clamp(max=torch.finfo(dtype).max).to(dtype)
    rounded_up = cast.to(torch.float64) > values
    return torch.where(rounded_up, torch.nextafter(cast, torch.zeros_like(cast)), cast)


def bounded_factors(weights: torch.Tensor, norms: torch.Tensor, bound: float, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample factors in ``dtype`` such that ``||factor_i * g_i|| <= bound`` holds after rounding.

    ``weights`` are the mechanism's float64 factors and ``norms`` the float64 norms of the gradients they
    multiply (from :func:`per_sample_norms`). A weight is lowered only where ``weight * norm`` comes within
    ``FACTOR_MARGIN`` of the bound (or past it), so a mechanism whose contributions stay well inside it
    is unchanged; lowering a factor never raises a contribution.
    """
    cap = (bound * (1.0 - FACTOR_MARGIN)) / norms  # a zero norm gives inf: any weight is safe there
    return round_toward_zero(torch.minimum(weights.to(torch.float64), cap).clamp(min=0.0), dtype)
