"""RunConfig: the fully resolved, typed description of one run, and its hash.

Resolution order: recipe (dataset x mechanism) <- ``--config FILE.toml`` <- command-line flags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
import sys
import tomllib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from dpbench.errors import BadInput
from dpbench.recipes import recipe_for

if TYPE_CHECKING:
    from dpbench.tuning.recipes_file import TunedRecipe

#: Smallest accepted clipping bound: below it float32 products of per-sample gradients reach the subnormal
#: range, where rounding is no longer relative and a contribution could pass C (persample/norms.py).
MIN_CLIP = 1e-12

#: ``--grad-sample`` values: the fast book-keeping path, or Opacus' per-sample gradients (the reference).
GRAD_SAMPLE_PATHS = ("fast", "reference")

#: Fields that do not change the result distribution and so stay out of the config hash.
NOT_HASHED = ("seed", "device", "out", "data_dir", "physical_batch_size", "secure", "force", "grad_sample",
              "recipe_source", "recipes")


@dataclass(frozen=True)
class RunConfig:
    mech: str
    dataset: str
    model: str
    eps: float
    delta: float
    batch_size: int
    epochs: float | None
    steps: int | None
    lr: float
    optimizer: str
    momentum: float
    clip: float
    seed: int = 0
    physical_batch_size: int | None = None
    secure: bool = False
    device: str = "cpu"
    data_dir: str | None = None
    out: str = "results/runs.csv"
    force: bool = False
    mech_params: dict[str, Any] = field(default_factory=dict)
    #: How per-sample gradients are computed: "fast" (book-keeping) or "reference" (Opacus); same update.
    grad_sample: str = "fast"
    #: What calibrates the noise and reports eps_spent: "rdp" (the mechanism's RDP curve), "pld" or "prv".
    accountant: str = "rdp"
    #: Where the defaults came from: a built-in recipe's cited source, or "<study file>#<trial>" of a tuned one.
    recipe_source: str = ""
    #: The tuned-recipes file the defaults came from (``--recipes``), if any.
    recipes: str | None = None

    def num_steps(self, n: int) -> int:
        """T = floor(E * N / B) unless --steps was given (design.md: one definition everywhere)."""
        if self.steps is not None:
            return self.steps
        return int(math.floor(self.epochs * n / self.batch_size))

    def nominal_epochs(self, n: int) -> float:
        return self.epochs if self.steps is None else self.steps * self.batch_size / n

    def sample_rate(self, n: int) -> float:
        return self.batch_size / n

    def command(self) -> str:
        """The fully resolved ``dpbench run`` command that reproduces this run (recipe-independent)."""
        parts = ["dpbench", "run", "--mech", self.mech, "--dataset", self.dataset, "--model", self.model]
        if not math.isinf(self.eps):  # a non-private mechanism runs at eps = inf and takes no --eps
            parts += ["--eps", exact(self.eps)]
        parts += ["--delta", exact(self.delta), "--batch-size", str(self.batch_size)]
        parts += ["--steps", str(self.steps)] if self.steps is not None else ["--epochs", exact(self.epochs)]
        parts += ["--lr", exact(self.lr), "--optimizer", self.optimizer, "--momentum", exact(self.momentum),
                  "--clip", exact(self.clip), "--seed", str(self.seed)]
        for key, value in sorted(self.mech_params.items()):
            parts += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        if self.secure:
            parts.append("--secure")
        if self.force:
            parts.append("--force")
        if self.grad_sample != "fast":
            parts += ["--grad-sample", self.grad_sample]
        if self.accountant != "rdp":
            parts += ["--accountant", self.accountant]
        if self.recipes:  # every value is explicit above; this records (and re-reads) where they came from
            parts += ["--recipes", self.recipes]
        return shlex.join(parts)

    def hash(self, dataset_variant: str) -> str:
        """Hash of everything that defines the experiment; excludes seed, device, paths, versions."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_HASHED}
        if d["accountant"] == "rdp":  # the default leaves the hashes of rows written before the option unchanged
            del d["accountant"]
        d["dataset_variant"] = dataset_variant
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def exact(value: float) -> str:
    """A number as short as ``:g`` writes it where that is exact, else every digit (tuned values have many), so
    that a command re-creates the very configuration, and its hash."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def parse_value(text: str) -> Any:
    """``--set`` value: int, then float (``inf`` allowed), then true/false, else the string."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip() or not key.isidentifier():
            raise BadInput(f"--set {item!r}: expected key=value, e.g. --set q_cap=0.05")
        out[key] = parse_value(value.strip())
    return out


def load_toml(path: str, what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a BadInput naming ``what`` and the path."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise BadInput(f"{what} {path!r}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{what} {path!r}: not valid TOML ({exc})") from None


def options_from_table(table: dict[str, Any]) -> dict[str, Any]:
    """Flag names as keys (dashes allowed), mechanism parameters under ``set``."""
    out = {k.replace("-", "_"): v for k, v in table.items() if k != "set"}
    if "set" in table:
        out["mech_params"] = dict(table["set"])
    return out


def read_config_file(path: str) -> dict[str, Any]:
    """A TOML file with the same keys as the flags and a ``[set]`` table."""
    return options_from_table(load_toml(path, "--config"))


def resolve(options: dict[str, Any], config_file: str | None = None) -> RunConfig:
    """Merge recipe, config file and flags (``None`` = not given) into a RunConfig.

    ``options["recipes"]`` (or ``recipes`` in the file) names a tuned-recipes TOML (``dpbench tune``), whose
    entry replaces the built-in recipe; flags and the file still override it.
    """
    from_file = read_config_file(config_file) if config_file else {}
    recipes_path = options.get("recipes") or from_file.pop("recipes", None)
    options = {k: v for k, v in options.items() if k != "recipes"}
    flags = {k: v for k, v in options.items() if v is not None and k != "mech_params"}
    check_one_horizon(flags, "")
    check_one_horizon(from_file, f" in --config {config_file}")
    for flag, other in (("steps", "epochs"), ("epochs", "steps")):
        if flag in flags:  # a flag replaces the file's horizon, whichever of the two the file gave
            from_file.pop(other, None)
    given = {**from_file, **flags}
    params = dict(given.get("mech_params") or {})
    params.update(options.get("mech_params") or {})
    given.setdefault("dataset", "mnist")
    if "mech" not in given:
        raise BadInput("missing --mech")
    from dpbench.data import DATASETS
    from dpbench.mechanisms import MECHANISMS

    MECHANISMS.entry(given["mech"])  # unknown names fail here, with a "did you mean"
    DATASETS.entry(given["dataset"])
    eps = float(given.get("eps", "nan"))
    mech = given["mech"]
    if math.isinf(eps) and eps > 0 and is_private(mech):
        mech = "nonprivate"  # --eps inf is the non-private control
    if not is_private(mech):
        eps = float("inf")
    recipe = recipe_for(given["dataset"], mech, given.get("model")).as_dict()  # a model may have its own recipe
    source = recipe.pop("source")
    if recipes_path:
        tuned = tuned_recipe(recipes_path, mech, given["dataset"], given.get("model"), eps)
        recipe.update(tuned.options())
        params = {**tuned.mech_params, **params}
        source = tuned.source
    merged = {**recipe, **given, "mech": mech, "eps": eps, "mech_params": params, "recipe_source": source,
              "recipes": recipes_path or None}
    if "steps" in given and "epochs" not in given:
        merged["epochs"] = None
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise BadInput(f"unknown option(s) in --config: {', '.join(unknown)}")
    merged.setdefault("delta", 1e-5)
    merged.setdefault("steps", None)
    if recipes_path and "steps" not in given:
        tuned_epochs = recipe["epochs"]
        fitted = fit_tuned_horizon({**merged, "epochs": tuned_epochs})
        if fitted is not None:
            cut = (f"{merged['recipe_source']} (epochs {tuned_epochs:g} -> {fitted:g}: eps {eps:g} unreachable at "
                   f"{tuned_epochs:g})")
            if "epochs" not in given:
                note(f"{mech} on {merged['dataset']}: eps {eps:g} is unreachable at the tuned horizon "
                     f"({tuned_epochs:g} epochs of batch {merged['batch_size']}); using {fitted:g} epochs, the "
                     f"longest halving that reaches it (every other tuned value kept)")
                merged["epochs"], merged["recipe_source"] = fitted, cut
            elif given["epochs"] == fitted:  # the rule's horizon given back, as by the command a row records
                merged["recipe_source"] = cut
    return RunConfig(**merged)


def fit_tuned_horizon(options: dict[str, Any]) -> float | None:
    """The epochs to train a tuned recipe for when its own cannot reach the target eps; None when they can.

    A recipe tuned at one eps may train too long for a smaller one (a mechanism whose own bound needs a
    minimum of noise per step, such as GED, cannot reach eps 1 at 40 epochs of batch 1024 on MNIST). The
    rule (benchmarks/PROTOCOL.md, Deviations) keeps every other tuned value and takes the longest halving of
    the horizon that reaches the eps. None also where no halving reaches it, and for values that are
    themselves invalid, which ``validate`` names.
    """
    from dpbench.data import DATASETS
    from dpbench.recipes import reachable_epochs

    epochs, eps, batch_size = options["epochs"], options["eps"], options["batch_size"]
    n = DATASETS.entry(options["dataset"]).meta.get("train_size")
    if (not is_private(options["mech"]) or not (isinstance(eps, (int, float)) and 0 < eps < math.inf)
            or not isinstance(batch_size, int) or not n or not 0 < batch_size <= n
            or not (isinstance(epochs, (int, float)) and epochs > 0)
            or not (isinstance(options["clip"], (int, float)) and options["clip"] >= MIN_CLIP)):
        return None
    fitted = reachable_epochs(options["mech"], options["mech_params"], int(n), batch_size=batch_size,
                              clip=options["clip"], epochs=epochs, eps=eps, delta=options["delta"])
    return None if fitted is None or fitted == epochs else fitted


def tuned_recipe(path: str, mech: str, dataset: str, model: str | None, eps: float) -> "TunedRecipe":
    """The tuned recipe of ``path`` for this run (the dataset's base: ``mnist_val`` reads ``mnist``'s)."""
    from dpbench.recipes import base_dataset
    from dpbench.tuning.recipes_file import choose, read_recipes

    chosen, said = choose(read_recipes(path), path, mech=mech, dataset=base_dataset(dataset), model=model, eps=eps)
    if said:
        note(said)
    return chosen


_NOTES_SAID: ContextVar[set[str] | None] = ContextVar("dpbench_notes_said", default=None)


def note(text: str) -> None:
    """``note: <text>`` on stderr; inside :func:`notes_said_once`, a note already said there is not repeated."""
    said = _NOTES_SAID.get()
    if said is not None:
        if text in said:
            return
        said.add(text)
    print(f"note: {text}", file=sys.stderr)


@contextmanager
def notes_said_once() -> Iterator[None]:
    """Say each distinct note once in the block: a sweep resolves every configuration once per seed, and the
    same note for each seed of it would bury the rest of its output."""
    token = _NOTES_SAID.set(set())
    try:
        yield
    finally:
        _NOTES_SAID.reset(token)


def check_one_horizon(options: dict[str, Any], where: str = "") -> None:
    """--epochs and --steps both define T; given together, one would be silently ignored."""
    if "steps" in options and "epochs" in options:
        raise BadInput(f"--epochs {options['epochs']} and --steps {options['steps']} given together{where}: give one "
                       f"of them (--steps {options['steps']} would have been used and --epochs ignored)")


def check_grad_sample(path: str) -> None:
    """A per-sample path that exists (``GRAD_SAMPLE_PATHS``)."""
    if path not in GRAD_SAMPLE_PATHS:
        raise BadInput(f"--grad-sample {path!r}: must be {' or '.join(GRAD_SAMPLE_PATHS)}")


def check_clip(clip: float) -> None:
    """A clipping bound the float32 arithmetic can keep every contribution under (see ``MIN_CLIP``)."""
    if not (clip >= MIN_CLIP and math.isfinite(clip)):
        raise BadInput(f"--clip {clip}: must be a finite number >= {MIN_CLIP:g}")


def is_private(mech: str) -> bool:
    """Whether mechanism ``mech`` trains under a privacy guarantee (its class says so, not its name)."""
    from dpbench.mechanisms import MECHANISMS

    return bool(MECHANISMS.get(mech).private)


def validate_options(cfg: RunConfig) -> None:
    """Reject bad values that need no data (checked before any dataset is loaded or downloaded)."""
    private = is_private(cfg.mech)
    if private and math.isnan(cfg.eps):
        raise BadInput("missing or invalid --eps: give a positive number (or inf for the non-private control)")
    if private and cfg.eps <= 0:
        raise BadInput(f"--eps {cfg.eps}: must be a positive number (or inf)")
    if not (0.0 < cfg.delta < 1.0) or math.isnan(cfg.delta):
        raise BadInput(f"--delta {cfg.delta}: must be in (0, 1)")
    if not (isinstance(cfg.batch_size, int) and cfg.batch_size > 0):
        raise BadInput(f"--batch-size {cfg.batch_size}: must be a positive integer")
    if cfg.physical_batch_size is not None and cfg.physical_batch_size <= 0:
        raise BadInput(f"--physical-batch-size {cfg.physical_batch_size}: must be positive")
    if cfg.steps is not None and cfg.steps <= 0:
        raise BadInput(f"--steps {cfg.steps}: must be positive")
    if cfg.steps is None and (cfg.epochs is None or not cfg.epochs > 0):
        raise BadInput(f"--epochs {cfg.epochs}: must be positive")
    if not cfg.lr > 0:
        raise BadInput(f"--lr {cfg.lr}: must be positive")
    check_clip(cfg.clip)
    if not 0 <= cfg.momentum < 1:
        raise BadInput(f"--momentum {cfg.momentum}: must be in [0, 1)")
    if cfg.optimizer not in ("sgd", "adam"):
        raise BadInput(f"--optimizer {cfg.optimizer!r}: must be sgd or adam")
    check_grad_sample(cfg.grad_sample)
    from dpbench.privacy.accounting import check_accountant_name

    check_accountant_name(cfg.accountant)


def validate(cfg: RunConfig, n: int) -> None:
    """Reject bad values before anything is trained or written (exit 2, value named)."""
    validate_options(cfg)
    if cfg.delta >= 1.0 / n and not cfg.force:
        raise BadInput(f"--delta {cfg.delta}: must be below 1/N = {1.0 / n:.3g} for N = {n} (use --force to override)")
    if cfg.batch_size > n:
        raise BadInput(f"--batch-size {cfg.batch_size}: must be in [1, N = {n}]")
    if cfg.num_steps(n) < 1:
        raise BadInput(f"--epochs {cfg.epochs}: gives no step with batch {cfg.batch_size} and N = {n}")


def check_writable(out: str) -> None:
    """Fail early (before training) when the results CSV cannot be written; leaves nothing behind."""
    path = Path(out)
    if path.is_dir():
        raise BadInput(f"--out {out}: is a directory")
    created: list[Path] = []
    existed = path.exists()
    try:
        for parent in reversed(path.parents):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise BadInput(f"--out {out}: not writable ({exc.strerror})") from None
    finally:
        if not existed and path.exists():
            path.unlink()
        for d in reversed(created):
            d.rmdir()
