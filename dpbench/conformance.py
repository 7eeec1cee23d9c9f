"""``dpbench check MECH``: conformance checks that any registered mechanism, a plugin's too, must pass.

Each property is measured through the real training step (``engine.train``) on a tiny linear model,
never taken from the mechanism's word:

- *contribution*: one record's contribution to the released sum (the noise switched off, every other
  record's gradient zero, so the release is that contribution alone) stays within the l2 bound the
  accountant assumes (``Mechanism.sensitivity``), for gradients of norm 0, subnormal, ordinary and
  huge, and for each parameter's declared extreme values (``Param.extremes``);
- *canary*: the audit's canary is at least as strong as any record measured and within that bound;
- *noise*: the released noise, estimated from repeated draws, has the standard deviation the
  accountant assumed (sigma times the bound for the sampled-Gaussian curve; ``Mechanism.noise_std`` where
  a mechanism brings its own accountant);
- *physical batch*: splitting the batch into physical chunks changes no result beyond rounding;
- *empty batch*: a step whose Poisson sample is empty still releases noise and counts as a step;
- *resume*: a run killed after a checkpoint and resumed ends with the straight run's weights, bit for bit;
- *accounting*: where a mechanism states its release as sampled Gaussians (``sampled_gaussians``, which PLD
  and PRV account), that release has exactly the RDP curve the mechanism reports, at several noise levels,
  rates and step counts, so every accountant accounts the same mechanism.

The same functions run under pytest (``tests/test_conformance.py``).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from dpbench.checkpoint import Checkpointer
from dpbench.config import RunConfig, resolve
from dpbench.data.base import DatasetBundle
from dpbench.engine import TrainOutcome, train
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms.base import Mechanism
from dpbench.privacy.release import release_rdp

FEATURES, CLASSES = 8, 3
CPU = torch.device("cpu")
#: Input scales of the record under test: its gradient norm is proportional (the model starts at zero).
RECORD_SCALES: tuple[tuple[str, float], ...] = (("zero", 0.0), ("subnormal", 1e-41), ("tiny", 1e-20),
                                                ("ordinary", 1.0), ("large", 1e6), ("huge", 1e30))
CLIPS = (1e-8, 1.0)


@dataclass
class Property:
    name: str
    ok: bool
    detail: str


class _Killed(Exception):
    pass


def _zero_linear() -> nn.Module:
    """A linear map at zero, no bias: a record's gradient is (1/K - onehot(y)) x^T, so its norm scales with
    |x| and a record with x = 0 contributes exactly nothing, whatever the weights have become."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, CLASSES, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _bundle(x: torch.Tensor, y: torch.Tensor) -> DatasetBundle:
    return DatasetBundle("check", "check", x, y, x[:4].clone(), y[:4].clone(), num_classes=CLASSES)


def _config(name: str, params: dict[str, Any], **overrides: Any) -> RunConfig:
    base = resolve({"mech": name, "dataset": "synthetic", "eps": 3.0, "steps": 4, "mech_params": params})
    fields = dict(model="linear", batch_size=8, lr=0.1, optimizer="sgd", momentum=0.0, clip=1.0,
                  physical_batch_size=None, seed=0, epochs=None)
    fields.update(overrides)
    return dataclasses.replace(base, **fields)


def _train(cfg: RunConfig, data: DatasetBundle, noise: float, steps: int,
           on_release: Callable[[Mechanism, list[torch.Tensor]], None] | None = None,
           checkpointer: Checkpointer | None = None, resume: bool = False,
           mech: Mechanism | None = None) -> tuple[Mechanism, TrainOutcome]:
    """One run of the real loop; ``on_release`` sees every released (noised, summed) gradient."""
    mech = mech or get_mechanism(cfg.mech)(**cfg.mech_params)
    mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)

    def watch(optimizer: torch.optim.Optimizer) -> None:
        if on_release is None:
            return
        add_noise = optimizer.add_noise

        def add_noise_and_watch() -> None:  # the release is p.grad right after the noise
            add_noise()
            on_release(mech, [p.grad.detach().double().clone() for p in optimizer.params])

        optimizer.add_noise = add_noise_and_watch

    out = train(cfg, mech, data, noise, steps, CPU, show_progress=False, on_optimizer=watch,
                checkpointer=checkpointer, resume=resume, model_factory=_zero_linear)
    return mech, out


def _flat_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


def _record_data(scale: float, others: int = 7) -> DatasetBundle:
    """``others`` records with zero inputs (zero gradients) and one record with inputs of size ``scale``."""
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(others + 1, FEATURES)
    x[-1] = torch.randn(FEATURES, generator=g).sign() * scale if scale else 0.0
    y = torch.arange(others + 1) % CLASSES
    return _bundle(x, y)


def _parameter_settings(mech_cls: type[Mechanism], params: dict[str, Any]) -> list[dict[str, Any]]:
    """The given parameters, then each declared extreme value of a parameter the caller did not set."""
    settings = [dict(params)]
    for spec in mech_cls.param_specs:
        if spec.name not in params:
            settings += [{**params, spec.name: value} for value in spec.extremes]
    return settings


def check_contribution(name: str, params: dict[str, Any], grad_sample: str = "fast") -> tuple[Property, float]:
    """The property, and the largest measured contribution relative to the bound (the canary must reach it)."""
    worst, worst_at = 0.0, ""
    for setting in _parameter_settings(get_mechanism(name), params):
        for clip in CLIPS:
            for label, scale in RECORD_SCALES:
                # q = 1/2: the record is in some steps
                cfg = _config(name, setting, grad_sample=grad_sample, clip=clip, batch_size=4)
                seen: list[tuple[float, float]] = []
                _train(cfg, _record_data(scale), 0.0, 6,
                       lambda mech, rel: seen.append((_flat_norm(rel), mech.sensitivity(clip))))
                for norm, bound in seen:
                    if math.isnan(norm):  # a NaN release reveals as much as an unbounded one
                        norm = math.inf
                    if norm / bound > worst:
                        worst, worst_at = norm / bound, f"{setting or 'defaults'}, C = {clip:g}, a {label} gradient"
    ok = worst <= 1.0
    detail = (f"largest contribution {worst:.9g} x the accountant's bound" + (f" ({worst_at})" if worst_at else "")
              + ("" if ok else ": a record can contribute more than accounted"))
    return Property("contribution", ok, detail), worst


def check_canary(name: str, params: dict[str, Any], largest: float, grad_sample: str = "fast") -> Property:
    """The canary (after a step, in units of the bound) is within the bound and no weaker than any real record."""
    cfg = _config(name, params, grad_sample=grad_sample)
    mech, _ = _train(cfg, _record_data(1.0), 0.0, 2)
    direction = [torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(3))]
    bound = mech.sensitivity(cfg.clip)
    ratio = _flat_norm(mech.canary_contribution(direction, cfg.clip)) / bound
    ok = largest * (1 - 1e-6) <= ratio <= 1 + 1e-9
    return Property("canary", ok, f"canary {ratio:.9g} x the bound; records measured up to {largest:.9g} x"
                    + ("" if ok else ": the audit's canary is not the accountant's worst case"))


def _accounted_std(mech: Mechanism, noise_multiplier: float, clip: float) -> float:
    """The noise std the accountant assumes: sigma times the bound for the sampled-Gaussian curve (whatever
    ``noise_std`` claims), the mechanism's own declaration where it brings its own accountant."""
    if type(mech).rdp is Mechanism.rdp:
        return noise_multiplier * mech.sensitivity(clip)
    return mech.noise_std(noise_multiplier, clip)


def check_noise(name: str, params: dict[str, Any], steps: int = 150, grad_sample: str = "fast") -> Property:
    """Pooled standard deviation of releases of all-zero gradients, in units of the accounted noise std.

    A coordinate released exactly 0 got no noise (RS's dropped coordinates): it is left out of the
    estimate, and a second run with one real record must leave it 0 too (no record may move it).
    """
    cfg = _config(name, params, grad_sample=grad_sample, clip=0.5)
    pure: list[torch.Tensor] = []
    _train(cfg, _record_data(0.0), 1.3, steps,
           lambda mech, rel: pure.append(torch.cat([t.flatten() for t in rel]) / _accounted_std(mech, 1.3, cfg.clip)))
    with_record: list[torch.Tensor] = []
    _train(cfg, _record_data(1.0), 1.3, steps, lambda mech, rel: with_record.append(torch.cat([t.flatten() for t in rel])))
    noiseless = torch.stack(pure) == 0
    moved = int((torch.stack(with_record)[noiseless] != 0).sum())
    values = torch.stack(pure)[~noiseless]
    measured = float(values.pow(2).mean().sqrt())  # the mean is 0: the gradients are all zero
    tolerance = 6 * math.sqrt(0.5 / len(values)) + 0.01  # 6 standard errors of a Gaussian std estimate
    ok = abs(measured - 1.0) <= tolerance and moved == 0
    detail = (f"measured noise std {measured:.4f} x the accounted one over {len(values)} draws (tolerance "
              f"{tolerance:.3f})" + (f"; {int(noiseless.sum())} coordinates released without noise, none moved "
                                     f"by a record" if noiseless.any() else ""))
    if moved:
        detail += f": a record moved {moved} coordinates that were released without noise"
    elif not ok:
        detail += ": the noise is not what was accounted"
    return Property("noise", ok, detail)


def _ordinary_data(n: int = 24) -> DatasetBundle:
    g = torch.Generator().manual_seed(2)
    return _bundle(torch.randn(n, FEATURES, generator=g), torch.arange(n) % CLASSES)


def _weights(out: TrainOutcome) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in out.model.parameters()])


def check_physical_batch(name: str, params: dict[str, Any], grad_sample: str = "fast") -> Property:
    runs = [_weights(_train(_config(name, params, grad_sample=grad_sample, physical_batch_size=size),
                            _ordinary_data(), 1.0, 5)[1])
            for size in (None, 1)]
    diff = float((runs[0] - runs[1]).abs().max())
    ok = bool(torch.allclose(runs[0], runs[1], rtol=1e-4, atol=1e-6))
    return Property("physical batch", ok, f"chunks of 1 vs whole batches: max |dw| = {diff:.3g}"
                    + ("" if ok else ": the result depends on the physical batch size"))


def check_empty_batch(name: str, params: dict[str, Any], steps: int = 40, grad_sample: str = "fast") -> Property:
    """At an expected batch of one record, some Poisson batches are empty (about e^-1 of them): each must count."""
    releases: list[float] = []
    sizes: list[int] = []
    mech = get_mechanism(name)(**params)
    make_sampler = mech.make_sampler

    def recording_sampler(*args: Any) -> Any:
        for batch in make_sampler(*args):
            sizes.append(len(batch))
            yield batch

    mech.make_sampler = recording_sampler  # type: ignore[method-assign]
    cfg = _config(name, params, grad_sample=grad_sample, batch_size=1)
    _train(cfg, _ordinary_data(), 1.0, steps, lambda m, rel: releases.append(_flat_norm(rel)), mech=mech)
    empty = sizes.count(0)
    ok = empty > 0 and len(sizes) == len(releases) == steps and all(r > 0 for r in releases)
    return Property("empty batch", ok, f"{steps} steps ({empty} with an empty Poisson sample): {len(releases)} "
                    f"noisy releases" + ("" if ok else ": every step, an empty one too, must release noise"))


def check_resume(name: str, params: dict[str, Any], steps: int = 6, grad_sample: str = "fast") -> Property:
    cfg = _config(name, params, grad_sample=grad_sample)
    straight = _weights(_train(cfg, _ordinary_data(), 1.0, steps)[1])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ck.pt"

        class DiesMidway(Checkpointer):
            def maybe_save(self, state_fn):  # noqa: ANN001
                saved = super().maybe_save(state_fn)
                if saved and state_fn()["step"] >= steps // 2:
                    raise _Killed
                return saved

        try:
            _train(cfg, _ordinary_data(), 1.0, steps, checkpointer=DiesMidway(path, every_s=0.0))
        except _Killed:
            pass
        resumed = _weights(_train(cfg, _ordinary_data(), 1.0, steps, checkpointer=Checkpointer(path, 0.0),
                                  resume=True)[1])
    diff = float((straight - resumed).abs().max())
    ok = bool(torch.equal(straight, resumed))
    return Property("resume", ok, f"killed at step {steps // 2} of {steps} and resumed: max |dw| = {diff:.3g}"
                    + ("" if ok else ": state that a checkpoint does not carry (declare it in state_dict)"))


#: (noise multiplier, q, steps) at which the stated release and the RDP curve are compared.
ACCOUNTING_POINTS = ((1.3, 0.05, 20), (0.8, 0.2, 7), (4.0, 0.01, 300), (0.6, 1.0, 3))


def check_accounting(name: str, params: dict[str, Any]) -> Property:
    """The release stated for PLD and PRV has the mechanism's own RDP curve (relative 1e-9 at every order)."""
    mech = get_mechanism(name)(**params)
    cfg = _config(name, params)
    mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
    if mech.sampled_gaussians(1.0, 0.05, 1) is None:
        return Property("accounting", True, f"RDP only ({mech.rdp_only_reason}): --accountant pld and prv refused")
    worst, where = 0.0, ""
    for noise, q, steps in ACCOUNTING_POINTS:
        orders, curve = mech.rdp(noise, q, steps)
        stated = release_rdp(mech.sampled_gaussians(noise, q, steps), list(orders))
        both = np.isfinite(curve) & np.isfinite(stated)
        if not np.array_equal(np.isfinite(curve), np.isfinite(stated)):
            worst, where = math.inf, f"sigma {noise}, q {q}, T {steps}: finite at different orders"
            break
        gap = float(np.max(np.abs(curve[both] - stated[both]) / np.maximum(np.abs(curve[both]), 1e-300), initial=0.0))
        if gap > worst:
            worst, where = gap, f"sigma {noise}, q {q}, T {steps}"
    ok = worst <= 1e-9
    return Property("accounting", ok, f"stated release vs RDP curve: largest relative gap {worst:.3g}"
                    + (f" ({where})" if where else "")
                    + ("" if ok else ": PLD/PRV would account another mechanism than RDP does"))


def run_checks(name: str, params: dict[str, Any] | None = None, grad_sample: str = "fast") -> list[Property]:
    """Every property, in order, on per-sample path ``grad_sample``; a mechanism that is not private has none."""
    params = dict(params or {})
    if not get_mechanism(name).private:
        return []
    contribution, largest = check_contribution(name, params, grad_sample)
    return [contribution, check_canary(name, params, largest, grad_sample),
            check_noise(name, params, grad_sample=grad_sample), check_physical_batch(name, params, grad_sample),
            check_empty_batch(name, params, grad_sample=grad_sample),
            check_resume(name, params, grad_sample=grad_sample), check_accounting(name, params)]
