"""The mechanism plugin interface.

A DP-SGD step has five places where the mechanisms of the literature differ. A mechanism is one
class that overrides only the places it changes; the loop (``dpbench.engine``, ``dpbench.step``),
the per-chunk accumulation, empty batches, checkpoints and the audit's canary are the engine's:

1. sampling    ``make_sampler(n, q, steps, generator)`` -> ``steps`` lists of record indices
               (default: Poisson at rate q).
2. per-sample  declared by ``per_sample``:
   transform   ``PerSample.NORMS``: ``per_sample_weights(norms, clip)`` maps the float64 per-sample
               gradient norms (over all parameters, after ``coordinate_masks()`` if any) to float64
               weights; the engine forms ``sum_i w_i g_i`` with every ``||w_i g_i|| <= sensitivity(clip)``
               after rounding (default weights 1: DP-SGD's clipping). Needs only norms, so a fast path
               can avoid materialising per-sample gradients.
               ``PerSample.GRADIENTS``: ``transform(grads, clip)`` gets each parameter's per-sample
               gradients ``[n, *shape]`` of one physical chunk and returns that chunk's summed
               contribution per parameter (each record's within ``sensitivity(clip)``);
               ``per_sample_buffer(rows, width, like)`` may name a buffer to write them into.
3. noise       ``noise(summed, release)`` -> the released sum per parameter (default: Gaussian noise of
               std ``noise_multiplier * sensitivity(clip)`` on every coordinate).
4. update      ``update(released, release)`` applies the released sum to the model (default: divide
               by the expected batch size B and take the base optimizer's step).
5. accounting  ``rdp``, ``sample_rate`` (the release rate) and ``privacy_extras``; ``sampled_gaussians``
               states the release as a composition of Poisson-sampled Gaussians where it is one (PLD and
               PRV need it; a class that overrides ``rdp`` alone is RDP-only); ``sensitivity`` and
               ``noise_std`` state what the accountant assumes (``dpbench check`` measures all three).
   plus ``setup(ctx)`` once and ``begin_step(ctx, step)`` every step, which see a :class:`TrainContext`.

State: everything a mechanism keeps on itself is saved in checkpoints and restored on ``--resume``
by default (``state_dict``), except generators (the engine saves those, never in ``--secure`` mode)
and attributes named in ``transient`` (rebuilt by ``setup``), so a plugin cannot forget its state.
"""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from dpbench.errors import BadInput
from dpbench.persample.norms import bounded_factors, per_sample_norms
from dpbench.privacy.rdp import SGM_ORDERS, sgm_rdp
from dpbench.privacy.release import Release, SampledGaussian
from dpbench.recipes import Recipe, RecipeKey
from dpbench.registry import did_you_mean

if TYPE_CHECKING:
    from dpbench.config import RunConfig
    from dpbench.persample import BookKeeping


@dataclass(frozen=True)
class TuneRange:
    """Where ``dpbench tune`` searches a parameter: ``[low, high]`` (log scale by default), or ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = True
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not self.choices and not (self.low is not None and self.high is not None and self.low < self.high):
            raise ValueError(f"a tuning range needs low < high or choices: {self}")
        if self.log and not self.choices and self.low <= 0:
            raise ValueError(f"a log-scale tuning range needs low > 0: {self}")


@dataclass(frozen=True)
class Param:
    """A mechanism parameter settable with ``--set name=value``."""

    name: str
    type: type
    default: Any
    help: str
    #: Accepted values at the edges of the range, which ``dpbench check`` also tries.
    extremes: tuple[Any, ...] = ()
    #: Where ``dpbench tune`` searches it; None: not tuned (its default is used).
    tune: TuneRange | None = None

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
    model: torch.nn.Module  # private: wrapped for per-sample gradients (BookKeeping or Opacus' GradSampleModule)
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


class PerSample(enum.Enum):
    """What a mechanism's per-sample transform needs to see."""

    NORMS = "norms"  # a weight per record from its gradient norm (clipping, scaling, importance weights)
    GRADIENTS = "gradients"  # the whole per-sample gradient (ModelMix's l-inf cap, GED's top-k encoding)


def gaussian_noise(std: float, like: torch.Tensor, generator: torch.Generator | None,
                   secure_mode: bool = False) -> torch.Tensor:
    """N(0, std^2) shaped like ``like``; ``secure_mode`` draws it as Opacus' floating-point-hardened sum of 4."""
    if std == 0:
        return torch.zeros(like.shape, device=like.device, dtype=like.dtype)
    if secure_mode:
        torch.normal(mean=0, std=std, size=(1, 1), device=like.device, generator=generator)  # discarded
        total = torch.zeros(like.shape, device=like.device, dtype=like.dtype)
        for _ in range(4):
            total += torch.normal(mean=0, std=std, size=like.shape, device=like.device, generator=generator)
        return total / 2
    return torch.normal(mean=0, std=std, size=like.shape, device=like.device, generator=generator, dtype=like.dtype)


class DPBenchOptimizer(DPOptimizer):
    """The engine's private step over per-sample gradients (either path): each place is the mechanism's method.

    Physical chunks accumulate into the step's sum (the skipped ``step`` calls); the last chunk adds
    the audit's canary, has the mechanism release the noisy sum and apply its update. Mechanisms see
    this object as ``release`` in ``noise`` and ``update``: its ``params``, ``noise_multiplier``,
    ``max_grad_norm`` (C), ``expected_batch_size`` (B), ``generator`` (the noise generator),
    ``secure_mode`` and ``original_optimizer`` (the base optimizer).
    """

    #: Set by the audit: returns per-parameter tensors to add to the sum, or None to add nothing.
    canary: Callable[[], list[torch.Tensor] | None] | None = None
    #: Set by the engine on the fast path: the model's book-keeping wrapper, which replaces ``p.grad_sample``.
    fast: "BookKeeping | None" = None

    def __init__(self, optimizer: torch.optim.Optimizer, *, mechanism: "Mechanism", **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.mechanism = mechanism

    # -- helpers (public, instead of Opacus' private ones) -------------------------------------
    def take_per_sample_gradients(self, masks: list[torch.Tensor] | None = None, into: torch.Tensor | None = None
                                  ) -> list[torch.Tensor]:
        """This chunk's per-sample gradients, one ``[n, *shape]`` tensor per parameter in its dtype; each chunk's
        once. ``masks`` (one per parameter, 0/1) are applied first, as a data-independent sparsification. On the
        fast path ``into`` (see ``Mechanism.per_sample_buffer``) receives them and the views of it are returned."""
        if self.fast is not None:
            grads = self.fast.per_sample_gradients(into)
            return [g * m for g, m in zip(grads, masks)] if masks is not None else grads
        out = []
        for i, p in enumerate(self.params):
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            out.append(grad_sample * masks[i] if masks is not None else grad_sample)
            _mark_as_processed(p.grad_sample)
        return out

    def expect_empty_chunk(self) -> None:
        """The step's batch is empty: the next take yields zero per-sample gradients (no forward ran)."""
        if self.fast is not None:
            self.fast.empty()
            return
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def add_to_sum(self, contributions: list[torch.Tensor]) -> None:
        """Add one chunk's summed contribution (one tensor per parameter) to the step's sum."""
        for p, c in zip(self.params, contributions):
            p.summed_grad = c if p.summed_grad is None else p.summed_grad + c

    def take_sum(self) -> list[torch.Tensor]:
        """The step's summed contributions (canary included), once."""
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
        :meth:`take_per_sample_gradients`. Returns the norms. On the fast path, layers with a ghost form
        give both without materialised per-sample gradients.
        """
        if self.fast is not None:
            norms, contributions = self.fast.clipped_sum(weight, bound, masks)
            self.add_to_sum(contributions)
            return norms
        grad_samples = self.take_per_sample_gradients(masks)
        norms = per_sample_norms(grad_samples)
        weights = weight(norms) if len(norms) else torch.zeros_like(norms)
        contributions = []
        for p, grad_sample in zip(self.params, grad_samples):
            factors = bounded_factors(weights.to(grad_sample.device), norms.to(grad_sample.device), bound, p.dtype)
            contributions.append(torch.einsum("i,i...", factors, grad_sample))
        self.add_to_sum(contributions)
        return norms

    def gaussian(self, std: float, like: torch.Tensor) -> torch.Tensor:
        """Gaussian noise from the run's noise generator (hardened in ``--secure`` mode)."""
        return gaussian_noise(std, like, self.generator, self.secure_mode)

    def mean_of(self, released: list[torch.Tensor]) -> list[torch.Tensor]:
        """The released sum divided by the expected batch size B (in place), as ``p.grad``."""
        for p, r in zip(self.params, released):
            p.grad = r.view_as(p)
            p.grad /= self.expected_batch_size
        return [p.grad for p in self.params]

    # -- the step: Opacus' pre_step calls these in order ---------------------------------------
    def clip_and_accumulate(self) -> None:
        mech, clip = self.mechanism, self.max_grad_norm
        if mech.per_sample is PerSample.NORMS:
            self.accumulate_weighted(lambda norms: mech.per_sample_weights(norms, clip), mech.sensitivity(clip),
                                     masks=mech.coordinate_masks())
        else:
            into = None
            if self.fast is not None:
                into = mech.per_sample_buffer(self.fast.examples, sum(p.numel() for p in self.params), self.params[0])
            self.add_to_sum(mech.transform(self.take_per_sample_gradients(into=into), clip))

    def add_noise(self) -> None:
        if self.canary is not None:
            extra = self.canary()
            if extra is not None:
                for p, c in zip(self.params, extra):
                    p.summed_grad.add_(c.to(p.summed_grad))
        for p, released in zip(self.params, self.mechanism.noise(self.take_sum(), self)):
            p.grad = released.view_as(p)

    def scale_grad(self) -> None:
        """Nothing here: the mechanism's ``update`` decides how the release is applied."""

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        """Opacus' order (accumulate; unless skipped: noise, scale), without its need for ``p.grad_sample``."""
        if not self.params:
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        if self.fast is not None:
            self.fast.clear()

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.pre_step():
            self.mechanism.update([p.grad for p in self.params], self)


class Mechanism:
    """Base class of every mechanism; by itself it is DP-SGD (Abadi et al. 2016)."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""
    param_specs: ClassVar[tuple[Param, ...]] = ()
    #: The mechanism's analysis with the RDP accountant: sgm-rdp, dpis-rdp, modelmix-rdp, ged-rdp or none. The
    #: ``accountant`` column holds it, with -pld or -prv in place of -rdp when one of those calibrated the run.
    accountant: ClassVar[str] = "sgm-rdp"
    private: ClassVar[bool] = True
    #: Why only RDP can account this mechanism (its release is not a composition of sampled Gaussians);
    #: None where ``sampled_gaussians`` describes the release, so that PLD and PRV apply.
    rdp_only_reason: ClassVar[str | None] = None
    #: Shown in ``dpbench ls`` and reports when the mechanism or its accounting is our reconstruction.
    caveat: ClassVar[str | None] = None
    sgm_orders: ClassVar[tuple[float, ...]] = SGM_ORDERS
    #: This mechanism's own recipes, keyed by dataset or (dataset, model), each with its source; anything
    #: not here comes from the shared defaults (``dpbench.recipes``), DP-SGD's published rows.
    recipes: ClassVar[Mapping[RecipeKey, Recipe]] = {}
    #: Recipe fields this mechanism always sets, whichever recipe it falls back to (ModelMix: plain SGD,
    #: ``{"momentum": 0.0}``), so that a shared default it cannot run becomes one it can.
    recipe_changes: ClassVar[Mapping[str, Any]] = {}
    #: What the per-sample transform sees: gradient norms only (the default), or whole gradients.
    per_sample: ClassVar[PerSample] = PerSample.NORMS
    #: Attributes that ``setup`` rebuilds and checkpoints need not carry (caches, large derived tables).
    transient: ClassVar[tuple[str, ...]] = ()
    #: Cuts of ``dpbench tune``'s shared search space: the values of a shared dimension (``batch_size``,
    #: ``momentum``, ``epochs``) that this mechanism accepts, e.g. ``{"momentum": lambda m: m == 0}``.
    tune_constraints: ClassVar[Mapping[str, Callable[[Any], bool]]] = {}

    def __init__(self, **params: Any) -> None:
        self.params = self.resolve_params(params)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A class with its own RDP curve but no statement of its release must not inherit the sampled-Gaussian
        # one: PLD and PRV would then account a mechanism other than the one that trains.
        if "rdp" in cls.__dict__ and "sampled_gaussians" not in cls.__dict__ and cls.rdp_only_reason is None:
            cls.rdp_only_reason = "it states an RDP curve but not its release as sampled Gaussians"

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

    def sampled_gaussians(self, noise_multiplier: float, q: float, steps: int) -> Release | None:
        """The release of ``steps`` steps as a composition of Poisson-sampled Gaussians; None where it is not one.

        Its RDP must be ``rdp`` (``dpbench check`` compares them), so that every accountant accounts one mechanism.
        """
        if self.rdp_only_reason is not None:
            return None
        return (SampledGaussian(float(noise_multiplier), float(self.sample_rate(q)), int(steps)),)

    def privacy_extras(self, noise_multiplier: float, q: float, steps: int, delta: float) -> dict[str, Any]:
        """Further values an accountant reports beside ``eps`` (JSON-ready); none by default."""
        return {}

    # -- 1. sampling ------------------------------------------------------------------------
    def make_sampler(self, num_samples: int, q: float, steps: int,
                     generator: torch.Generator) -> Iterable[list[int]]:
        """Exactly ``steps`` batches of indices; Poisson sampling at rate q by default."""
        return UniformWithReplacementSampler(num_samples=num_samples, sample_rate=q,
                                             generator=generator, steps=steps)

    # -- 2. per-sample transform --------------------------------------------------------------
    def per_sample_weights(self, norms: torch.Tensor, clip: float) -> torch.Tensor:
        """``PerSample.NORMS``: float64 weights from float64 per-sample norms; 1 = clip to the sensitivity."""
        return torch.ones_like(norms)

    def coordinate_masks(self) -> list[torch.Tensor] | None:
        """``PerSample.NORMS``: data-independent 0/1 masks, one per parameter, applied before the norms."""
        return None

    def per_sample_buffer(self, rows: int, width: int, like: torch.Tensor) -> torch.Tensor | None:
        """``PerSample.GRADIENTS``: a row-major ``rows x width`` buffer (``like``'s dtype and device) that the
        fast path writes the chunk's per-sample gradients into, each parameter's flattened in its own columns
        in parameter order, so that ``transform`` gets views of it; None (the default): tensors of their own.
        A buffer kept from chunk to chunk saves the fresh memory of a large model's per-sample gradients."""
        return None

    def transform(self, grads: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
        """``PerSample.GRADIENTS``: one chunk's per-sample gradients -> its summed contribution per parameter.

        The gradients are this chunk's own (each chunk's are taken once), so ``transform`` may overwrite them."""
        raise NotImplementedError(f"{self.name} declares per_sample = GRADIENTS but has no transform")

    # -- 3. noise --------------------------------------------------------------------------------
    def noise(self, summed: list[torch.Tensor], release: DPBenchOptimizer) -> list[torch.Tensor]:
        """The released sum: Gaussian noise of std ``noise_multiplier * sensitivity(C)`` on every coordinate.

        The scale is the accountant's assumption itself, not ``noise_std``: that one is only a declaration
        which ``dpbench check`` compares the measured noise with, so a wrong one must not change the noise.
        """
        std = release.noise_multiplier * self.sensitivity(release.max_grad_norm)
        return [s + release.gaussian(std, s) for s in summed]

    # -- 4. update -------------------------------------------------------------------------------
    def update(self, released: list[torch.Tensor], release: DPBenchOptimizer) -> None:
        """Apply the released sum: its mean over the expected batch size, then the base optimizer's step."""
        release.mean_of(released)
        release.original_optimizer.step()

    def make_optimizer(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                       max_grad_norm: float, expected_batch_size: int,
                       generator: torch.Generator | None, secure_mode: bool = False) -> torch.optim.Optimizer:
        """The engine's step object over ``optimizer`` for this mechanism (used by the loop, not overridden).

        ``secure_mode``: Gaussian noise drawn the floating-point-hardened way (``--secure``).
        """
        return DPBenchOptimizer(optimizer, mechanism=self, noise_multiplier=noise_multiplier,
                                max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                loss_reduction="mean", generator=generator, secure_mode=secure_mode)

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        """Called once after the optimizer is built and before the first step."""

    def begin_step(self, ctx: TrainContext, step: int) -> None:
        """Called before each logical step (e.g. to redraw a mask, release a norm sum, move a schedule)."""

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the mechanism keeps on itself, for a checkpoint: not its parameters, not generators
        (the loop saves those, and only in reproducible mode), not ``transient`` attributes."""
        skip = {"params", *self.transient}
        state = {}
        for key, value in vars(self).items():
            if key in skip or isinstance(value, torch.Generator):
                continue
            if _holds_generator(value):
                raise TypeError(f"mechanism {self.name!r}: attribute {key!r} holds a generator; keep generators "
                                f"in attributes of their own (the loop saves them) or list {key!r} in transient")
            state[key] = copy.deepcopy(value)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        for key, value in state.items():
            setattr(self, key, value)

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


def _holds_generator(value: Any, depth: int = 0) -> bool:
    """Whether a generator hides inside ``value`` (containers and plain objects, a few levels deep)."""
    if isinstance(value, torch.Generator):
        return True
    if depth > 3:
        return False
    if isinstance(value, dict):
        return any(_holds_generator(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_generator(v, depth + 1) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, type)):
        return any(_holds_generator(v, depth + 1) for v in vars(value).values())
    return False
