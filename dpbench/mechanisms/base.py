"""The mechanism plugin interface.

A DP-SGD step has five places where the mechanisms of the literature differ. A mechanism is one
class that overrides only the places it changes; the training loop (``dpbench.engine``), data,
models and results are shared:

1. sampling              ``make_sampler``          (default: Poisson at rate q, Opacus' sampler)
2. per-sample transform  ``optimizer_class.clip_and_accumulate``   (default: clip to C)
3. noise                 ``optimizer_class.add_noise``             (default: N(0, (sigma C)^2) on the sum)
4. update                ``optimizer_class.step``                  (default: the base optimizer's step)
   plus ``setup`` (once) and ``begin_step`` (every step), which see a :class:`TrainContext`
5. accounting            ``rdp`` and ``sample_rate``               (default: sampled-Gaussian RDP)

Places 2-4 live in a subclass of Opacus' ``DPOptimizer``, so per-sample gradients, accumulation
over physical batches and noise generation stay Opacus'. The audit inserts a canary into a step
through ``DPBenchOptimizer.canary``, shaped by ``Mechanism.canary_contribution`` as the worst
case the mechanism's accountant assumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from dpbench.errors import BadInput
from dpbench.mechanisms.norms import bounded_factors, per_sample_norms
from dpbench.privacy.rdp import SGM_ORDERS, sgm_rdp
from dpbench.recipes import Recipe, RecipeKey
from dpbench.registry import did_you_mean

if TYPE_CHECKING:
    from dpbench.config import RunConfig


@dataclass(frozen=True)
class Param:
    """A mechanism parameter settable with ``--set name=value``."""

    name: str
    type: type
    default: Any
    help: str
    #: Accepted values at the edges of the range, which ``dpbench check`` also tries.
    extremes: tuple[Any, ...] = ()

    def coerce(self, value: Any) -> Any:
        """Check and convert a parsed ``--set`` value to this parameter's type."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
        elif self.type is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif self.type is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif isinstance(value, self.type):
            return value
        raise BadInput(f"--set {self.name}={value!r}: expected {self.type.__name__}")


@dataclass
class TrainContext:
    """What the loop hands a mechanism's ``setup`` and ``begin_step`` hooks."""

    cfg: "RunConfig"
    model: torch.nn.Module  # an Opacus GradSampleModule for private mechanisms
    optimizer: torch.optim.Optimizer  # what ``make_optimizer`` returned
    train_x: torch.Tensor  # the whole training split, on the device
    train_y: torch.Tensor
    criterion: torch.nn.Module  # mean cross-entropy
    noise_multiplier: float
    sample_rate: float  # q = B/N
    steps: int
    physical_batch_size: int
    device: torch.device
    #: ``make_generator("purpose")``: a generator derived from --seed, or from OS entropy with --secure.
    make_generator: Callable[[str], torch.Generator]
    #: ``build_model()``: a fresh, untrained instance of the run's model (initialised from torch's global RNG)
    build_model: Callable[[], torch.nn.Module] | None = None


class DPBenchOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with a hook that adds a canary to the summed gradient before noise."""

    #: Set by the audit: returns per-parameter tensors to add to the sum, or None to add nothing.
    canary: Callable[[], list[torch.Tensor] | None] | None = None

    def clip_and_accumulate(self) -> None:
        """DP-SGD's clipping to C, with every contribution within C after float32 rounding.

        Opacus' own clipping computes the factor from a float32 norm (off by up to ~1e-3 relative on
        large layers) and rounds it to nearest (up to 2x in the subnormal range); see ``norms.py``.
        """
        self.accumulate_weighted(lambda norms: torch.ones_like(norms), self.max_grad_norm)

    # -- public helpers for mechanisms (instead of Opacus' private ones) ------------------------
    def take_per_sample_gradients(self, masks: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """This chunk's per-sample gradients, one ``[n, *shape]`` tensor per parameter in its dtype; each chunk's
        once. ``masks`` (one per parameter, 0/1) are applied first, as a data-independent sparsification."""
        out = []
        for i, p in enumerate(self.params):
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            out.append(grad_sample * masks[i] if masks is not None else grad_sample)
            _mark_as_processed(p.grad_sample)
        return out

    def add_to_sum(self, contributions: list[torch.Tensor]) -> None:
        """Add one chunk's summed contribution (one tensor per parameter) to the step's sum."""
        for p, c in zip(self.params, contributions):
            p.summed_grad = c if p.summed_grad is None else p.summed_grad + c

    def take_sum(self) -> list[torch.Tensor]:
        """The step's summed contributions (canary included), once, for a mechanism's own noise."""
        out = []
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            out.append(p.summed_grad)
            _mark_as_processed(p.summed_grad)
        return out

    def accumulate_weighted(self, weight: Callable[[torch.Tensor], torch.Tensor], bound: float,
                            masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Add ``sum_i f_i g_i`` to the sum, ``f_i = weight(norms)_i`` lowered so that ``||f_i g_i|| <= bound``.

        ``weight`` maps the float64 per-sample norms to float64 factors; ``masks`` as in
        :meth:`take_per_sample_gradients`. Returns the norms.
        """
        grad_samples = self.take_per_sample_gradients(masks)
        norms = per_sample_norms(grad_samples)
        weights = weight(norms) if len(norms) else torch.zeros_like(norms)
        contributions = []
        for p, grad_sample in zip(self.params, grad_samples):
            factors = bounded_factors(weights.to(grad_sample.device), norms.to(grad_sample.device), bound, p.dtype)
            contributions.append(torch.einsum("i,i...", factors, grad_sample))
        self.add_to_sum(contributions)
        return norms

    def add_canary(self) -> None:
        """Add the audit's canary (if any) to the summed gradient; subclasses' ``add_noise`` call this first."""
        if self.canary is not None:
            extra = self.canary()
            if extra is not None:
                for p, c in zip(self.params, extra):
                    p.summed_grad.add_(c.to(p.summed_grad))

    def add_noise(self) -> None:
        self.add_canary()
        super().add_noise()


class Mechanism:
    """Base class of every mechanism; by itself it is DP-SGD (Abadi et al. 2016)."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""
    param_specs: ClassVar[tuple[Param, ...]] = ()
    #: Name of the accountant in results: sgm-rdp, dpis-rdp, modelmix-rdp, ged-rdp or none.
    accountant: ClassVar[str] = "sgm-rdp"
    private: ClassVar[bool] = True
    #: Whether Opacus' PRV accountant of the sampled Gaussian describes this mechanism exactly.
    prv_applies: ClassVar[bool] = True
    #: Shown in ``dpbench ls`` and reports when the mechanism or its accounting is our reconstruction.
    caveat: ClassVar[str | None] = None
    sgm_orders: ClassVar[tuple[float, ...]] = SGM_ORDERS
    #: This mechanism's own recipes, keyed by dataset or (dataset, model), each with its source; anything
    #: not here comes from the shared defaults (``dpbench.recipes``), DP-SGD's published rows.
    recipes: ClassVar[Mapping[RecipeKey, Recipe]] = {}
    optimizer_class: ClassVar[type[DPBenchOptimizer]] = DPBenchOptimizer

    def __init__(self, **params: Any) -> None:
        self.params = self.resolve_params(params)

    # -- parameters -------------------------------------------------------------------------
    @classmethod
    def resolve_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Declared defaults overridden by ``given``; unknown keys are a BadInput."""
        specs = {p.name: p for p in cls.param_specs}
        for key in given:
            if key not in specs:
                hint = did_you_mean(key, list(specs))
                known = ", ".join(specs) or "none"
                raise BadInput(f"--set {key}: unknown parameter of mechanism {cls.name!r}{hint}; its parameters: {known}")
        return {name: (spec.coerce(given[name]) if name in given else spec.default) for name, spec in specs.items()}

    # -- 5. accounting ----------------------------------------------------------------------
    def bind(self, *, batch_size: int | None, clip: float | None) -> None:
        """Receive the run's expected batch size B and clipping bound C before any accounting.

        ``rdp`` sees only (noise, q, steps); a curve that also depends on B or C (ModelMix's
        rho = gamma * B / C) stores them here. ``engine.run`` and ``dpbench account`` call this.
        """

    def sample_rate(self, q: float) -> float:
        """Rate at which the differing record can enter the gradient release."""
        return q

    def rdp(self, noise_multiplier: float, q: float, steps: int) -> tuple[Iterable[float], np.ndarray]:
        """(orders, total RDP) of ``steps`` steps at expected rate ``q``."""
        return self.sgm_orders, sgm_rdp(self.sample_rate(q), noise_multiplier, steps, self.sgm_orders)

    def privacy_extras(self, noise_multiplier: float, q: float, steps: int, delta: float) -> dict[str, Any]:
        """Further values an accountant reports beside ``eps`` (JSON-ready); none by default."""
        return {}

    # -- 1. sampling ------------------------------------------------------------------------
    def make_sampler(self, num_samples: int, q: float, steps: int,
                     generator: torch.Generator) -> Iterable[list[int]]:
        """Exactly ``steps`` batches of indices; Poisson sampling at rate q by default."""
        return UniformWithReplacementSampler(num_samples=num_samples, sample_rate=q,
                                             generator=generator, steps=steps)

    # -- 2-4. transform, noise and update ----------------------------------------------------
    def make_optimizer(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                       max_grad_norm: float, expected_batch_size: int,
                       generator: torch.Generator | None) -> torch.optim.Optimizer:
        """Wrap the base optimizer; the result's ``step`` runs places 2-4."""
        return self.optimizer_class(optimizer, noise_multiplier=noise_multiplier,
                                    max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                    loss_reduction="mean", generator=generator)

    def setup(self, ctx: TrainContext) -> None:
        """Called once after the optimizer is built and before the first step."""

    def begin_step(self, ctx: TrainContext, step: int) -> None:
        """Called before each logical step (e.g. to redraw a mask, release a norm sum, move a schedule)."""

    def state_dict(self) -> dict[str, Any]:
        """Non-secret state a checkpoint must carry (generators made by ``ctx.make_generator`` are saved
        by the loop, and only in reproducible mode)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    # -- what the accountant assumes (the conformance checks hold the mechanism to it) ---------
    def sensitivity(self, clip: float) -> float:
        """l2 bound on one record's contribution to the summed release of the current step."""
        return clip

    def noise_std(self, noise_multiplier: float, clip: float) -> float:
        """Standard deviation of each coordinate's noise in the summed release of the current step."""
        return noise_multiplier * self.sensitivity(clip)

    # -- the audit's worst-case record ------------------------------------------------------
    def canary_contribution(self, direction: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
        """The summed-gradient contribution of the record the accountant assumes: norm C along ``direction``."""
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in direction))
        return [d * (clip / norm) for d in direction]

    # -- description -------------------------------------------------------------------------
    @classmethod
    def describe_params(cls) -> str:
        return ", ".join(f"{p.name}={p.default}" for p in cls.param_specs)
