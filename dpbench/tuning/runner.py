"""Running a tune: one Optuna study per mechanism in one SQLite file, trials as ordinary runs.

Every trial is ``engine.run`` on the validation split, calibrated to the tune's eps exactly as ``dpbench
run`` is; completed trials append their row to the trials CSV beside the study. Intermediate accuracies
(at a quarter, half and three quarters of the steps) feed a median pruner. A configuration whose eps
is unreachable, or that is otherwise invalid, is a pruned trial; a trial that crashes is a failed trial
with its command, and the tune goes on. ``trials`` counts finished (completed or pruned) trials per
mechanism over every invocation; workers take a file lock to ask for a trial, so ``--jobs`` never
overshoots it. One tune at a time holds a study file (a second is refused); so the trials a resumed
tune finds running were left by a killed one: they are marked failed and their parameters queued to run
again. A resumed tune's sampler is seeded from the study's state as well as ``--seed``, so it continues the
study's draws rather than repeating its first ones.
"""

from __future__ import annotations

import fcntl
import json
import math
import multiprocessing
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import optuna

from dpbench.config import RunConfig, resolve
from dpbench.data import DATASETS
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.recipes import Recipe, recipe_for
from dpbench.results import record_run
from dpbench.storage import held_exclusively
from dpbench.tuning.recipes_file import TunedRecipe
from dpbench.tuning.space import MechanismSpace, SharedSpace, mechanism_space

if TYPE_CHECKING:
    from dpbench.engine import Executed

#: Fractions of a trial's steps at which the validation accuracy is reported to the pruner.
INTERIM_FRACTIONS = (0.25, 0.5, 0.75)
#: Trials of a mechanism that complete before the pruner may stop any.
PRUNER_STARTUP_TRIALS = 4
#: Failed trials (crashes) of one mechanism after which its tune stops.
MAX_FAILURES = 5
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass(frozen=True)
class TuneRequest:
    mechs: tuple[str, ...]
    dataset: str  # as given (``mnist``); trials train on ``<dataset>_val``
    model: str | None
    eps: float
    trials: int
    study: str
    out: str
    jobs: int = 1
    seed: int = 0
    accountant: str = "rdp"
    data_dir: str | None = None
    shared: SharedSpace = SharedSpace()
    backend: str = "local"  # or "ray": trials as Ray tasks, the study kept by this process
    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0

    @property
    def val_dataset(self) -> str:
        return f"{self.dataset}_val"

    @property
    def trials_csv(self) -> str:
        return str(Path(self.study).with_suffix(".trials.csv"))


def storage(path: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{Path(path).resolve()}")


def base_recipe(req: TuneRequest, mech: str) -> Recipe:
    """The built-in recipe of ``mech`` for the tuned dataset and model (its optimizer and clip are kept)."""
    return recipe_for(req.dataset, mech, req.model)


def tuned_model(req: TuneRequest, mech: str) -> str:
    """The model tuned: ``--model``, else the recipe's (a (dataset, model) with no recipe of its own falls back
    to the dataset's, whose model is another)."""
    return req.model or base_recipe(req, mech).model


def space_of(req: TuneRequest, mech: str) -> MechanismSpace:
    return mechanism_space(mech, req.shared, base_recipe(req, mech).optimizer)


def study_meta(req: TuneRequest, mech: str) -> dict[str, Any]:
    """What a study belongs to; a study file reopened for anything else is refused."""
    return {"dataset": req.dataset, "model": tuned_model(req, mech), "eps": req.eps, "accountant": req.accountant,
            "shared_space": req.shared.describe(), "space": space_of(req, mech).fingerprint()}


def check_request(req: TuneRequest) -> dict[str, dict[str, Any]]:
    """Every check that needs no training; returns each mechanism's study metadata. Writes nothing."""
    if req.trials < 1:
        raise BadInput(f"--trials {req.trials}: must be at least 1")
    if req.jobs < 1:
        raise BadInput(f"--jobs {req.jobs}: must be at least 1")
    if req.dataset.endswith("_val"):
        raise BadInput(f"--dataset {req.dataset}: give the dataset to tune for ({req.dataset[:-4]}); "
                       f"trials train on its validation split")
    DATASETS.entry(req.dataset)
    if req.val_dataset not in DATASETS:
        raise BadInput(f"--dataset {req.dataset}: it has no validation split ({req.val_dataset}); the test split is "
                       f"never used for tuning")
    if not (req.eps > 0):
        raise BadInput(f"--eps {req.eps}: must be positive")
    metas = {}
    for mech in req.mechs:
        resolve({"mech": mech, "dataset": req.val_dataset, "model": req.model, "eps": req.eps})  # names, recipes
        metas[mech] = study_meta(req, mech)
    for path in (req.out, req.trials_csv):
        if Path(path).is_dir():
            raise BadInput(f"{path}: is a directory")
        parent = Path(path).resolve().parent
        probe = parent
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise BadInput(f"--out {path}: {probe} is not a directory")
        if not os.access(probe, os.W_OK):
            raise BadInput(f"--out {path}: {probe} is not writable")
    if Path(req.study).exists():
        common = {"dataset": req.dataset, "eps": req.eps, "accountant": req.accountant,
                  "shared_space": req.shared.describe()}
        for summary in optuna.study.get_all_study_summaries(storage(req.study), include_best_trial=False):
            seen = summary.user_attrs.get("dpbench")
            if seen is None:
                raise BadInput(f"--study {req.study}: holds study {summary.study_name!r}, not made by dpbench tune")
            mine = metas.get(summary.study_name, {})
            for key, ours in {**common, **{k: mine[k] for k in ("model", "space") if k in mine}}.items():
                if seen.get(key) == json.loads(json.dumps(ours)):  # as stored: tuples come back as lists
                    continue
                if key in ("space", "shared_space"):
                    what = ("its search space differs from the one asked (batch sizes, epochs, clip range, momentum, "
                            "learning-rate ranges or the mechanism's declared ranges)")
                else:
                    what = f"{key} {seen.get(key)!r} in the study, {ours!r} asked"
                raise BadInput(f"--study {req.study}: belongs to another configuration ({summary.study_name}: "
                               f"{what}); use another --study")
    return metas


def sampler_seed(seed: int, worker: int, trials_so_far: int) -> int:
    """The seed of a worker's sampler. A seeded sampler draws the same sequence in every process, so a
    resumed tune seeded as the first invocation was would propose the study's first trials again; the
    number of trials the study already holds makes each invocation's stream its own. A new study's seed is
    ``seed * 1000 + worker``, as it always was, so a study run in one go is drawn as before."""
    if trials_so_far == 0:
        return seed * 1000 + worker
    return int(np.random.SeedSequence((seed, worker, trials_so_far)).generate_state(1)[0])


def _sampler(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=PRUNER_STARTUP_TRIALS)


def make_pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0)


def open_study(req: TuneRequest, mech: str, meta: dict[str, Any], worker: int = 0) -> optuna.Study:
    """``mech``'s study in ``req.study`` (created when new), its sampler seeded for ``worker`` from
    ``req.seed`` and the trials the study holds now (``sampler_seed``)."""
    study = optuna.create_study(study_name=mech, storage=storage(req.study), direction="maximize",
                                pruner=make_pruner(), load_if_exists=True)
    if "dpbench" not in study.user_attrs:
        study.set_user_attr("dpbench", meta)
    study.sampler = _sampler(sampler_seed(req.seed, worker, len(study.get_trials(deepcopy=False))))
    return study


@contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def count_trials(study: optuna.Study, states: tuple) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def trial_config(req: TuneRequest, mech: str, options: dict[str, Any], params: dict[str, Any],
                 device: str | None = None) -> RunConfig:
    """The run of a trial: the sampled options on the validation split, calibrated to the tune's eps."""
    return resolve({"mech": mech, "dataset": req.val_dataset, "model": req.model, "eps": req.eps, "seed": req.seed,
                    "accountant": req.accountant, "data_dir": req.data_dir, "out": req.trials_csv,
                    "mech_params": params, "device": device, **options})


def train_reporting(cfg: RunConfig, trial: optuna.Trial, *, check_out: bool = True, number: int | None = None
                    ) -> Executed:
    """Train a trial's run, reporting validation accuracy at ``INTERIM_FRACTIONS`` of its steps to ``trial``;
    raises ``optuna.TrialPruned`` when the trial's pruner says so. Writes nothing but a progress line at each
    report, which names the trial ``number`` (default ``trial.number``; a Ray task's trial is a stand-in)."""
    from dpbench.engine import Interim, execute

    reports = 0
    started = time.perf_counter()

    def report(step: int, steps: int, accuracy: float) -> None:
        nonlocal reports
        reports += 1  # the pruner compares trials at the same fraction of their steps, whatever their horizon
        trial.report(accuracy, reports)
        label = trial.number if number is None else number
        print(interim_progress(cfg.mech, label, step, steps, accuracy, time.perf_counter() - started),
              file=sys.stderr, flush=True)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {accuracy:.4f} at step {step}")

    return execute(cfg, show_progress=False, checkpoint_every_s=math.inf, interim=Interim(INTERIM_FRACTIONS, report),
                   check_out=check_out)


def run_trial(req: TuneRequest, mech: str, space: MechanismSpace, trial: optuna.Trial) -> tuple[Any, float | None]:
    """(state, value) of one trial: an ordinary run on the validation split, its row in the trials CSV."""
    options, params = space.sample(trial)
    started = time.perf_counter()
    try:
        cfg = trial_config(req, mech, options, params)
        trial.set_user_attr("command", cfg.command())
        result = train_reporting(cfg, trial)
        record_run(req.trials_csv, result.row, result.record)
    except optuna.TrialPruned as exc:
        trial.set_user_attr("pruned", str(exc))
        return optuna.trial.TrialState.PRUNED, None
    except BadInput as exc:  # an unreachable eps or an invalid combination: pruned, never a crash
        trial.set_user_attr("pruned", f"invalid: {exc}")
        return optuna.trial.TrialState.PRUNED, None
    except Exception as exc:  # noqa: BLE001 - a crashing trial is recorded and the tune goes on
        trial.set_user_attr("error", repr(exc))
        return optuna.trial.TrialState.FAIL, None
    finally:
        trial.set_user_attr("wall_s", round(time.perf_counter() - started, 3))
    trial.set_user_attr("run_id", result.row["run_id"])
    return optuna.trial.TrialState.COMPLETE, float(result.row["test_acc"])


def work(req: TuneRequest, mech: str, meta: dict[str, Any], worker: int, failures_before: int = 0) -> None:
    """One worker: ask for trials under the lock until the mechanism has ``req.trials`` finished ones, or
    ``MAX_FAILURES`` trials failed in this invocation (``failures_before`` failed earlier)."""
    import torch

    if req.jobs > 1:  # J workers share the cores
        torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(req, mech, meta, worker)
    space = space_of(req, mech)
    lock = str(_ask_lock(req))
    while True:
        with _locked(lock):
            if _count_fail(study) - failures_before >= MAX_FAILURES:
                return
            busy = count_trials(study, FINISHED + (optuna.trial.TrialState.RUNNING,))
            if busy >= req.trials:
                return
            trial = study.ask()
        state, value = run_trial(req, mech, space, trial)
        study.tell(trial, value, state=state)
        print(trial_progress(study, mech, trial.number, req.trials, req.jobs), file=sys.stderr, flush=True)


def trial_progress(study: optuna.Study, mech: str, number: int, trials: int, jobs: int) -> str:
    """One line after a trial ends (a tune writes nothing else for many minutes): its outcome, how many of the
    mechanism's trials are finished, and the time left for it at the mean trial time so far."""
    from dpbench.progress import format_duration

    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    outcome = (f"validation accuracy {trial.value:.4f}" if trial.state == optuna.trial.TrialState.COMPLETE
               else trial.state.name.lower())
    walls = [float(t.user_attrs["wall_s"]) for t in finished if "wall_s" in t.user_attrs]
    left = math.ceil(max(0, trials - len(finished)) / max(1, jobs)) * (sum(walls) / len(walls)) if walls else math.nan
    wall = trial.user_attrs.get("wall_s", math.nan)
    return (f"{mech}: trial {number} {outcome} in {format_duration(wall)}; {len(finished)} of {trials} finished, "
            f"about {format_duration(left)} left for {mech}")


def interim_progress(mech: str, number: int, step: int, steps: int, accuracy: float, elapsed_s: float) -> str:
    """One line at each interim evaluation of a trial (a trial of a slow mechanism runs for hours between the
    lines after trials): where it is, its validation accuracy, and the time left in it at its pace so far."""
    from dpbench.progress import format_duration

    left = elapsed_s * (steps - step) / step
    return (f"{mech}: trial {number} at step {step} of {steps}, validation accuracy {accuracy:.4f} after "
            f"{format_duration(elapsed_s)}; about {format_duration(left)} left in this trial")


def _count_fail(study: optuna.Study) -> int:
    return count_trials(study, (optuna.trial.TrialState.FAIL,))


def tune(req: TuneRequest, on_mechanism: Any = None) -> list[TunedRecipe]:
    """Run (or resume) every mechanism's study to ``req.trials`` finished trials; the best recipe of each."""
    metas = check_request(req)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Path(req.study).parent.mkdir(parents=True, exist_ok=True)
    with held_exclusively(Path(req.study).with_suffix(".tune.lock"),
                          f"--study {req.study}: another dpbench tune is running on it"):
        try:
            with _backend(req):
                return [r for r in (_tune_one(req, mech, metas[mech], on_mechanism) for mech in req.mechs)
                        if r is not None]
        finally:
            _ask_lock(req).unlink(missing_ok=True)


@contextmanager
def _backend(req: TuneRequest) -> Iterator[None]:
    """With --backend ray, one Ray connection for every mechanism (a local instance starts once)."""
    if req.backend != "ray":
        yield
        return
    from dpbench.distributed import connected

    with connected(req.address):
        yield


def _ask_lock(req: TuneRequest) -> Path:
    return Path(req.study).with_suffix(".ask.lock")


def _tune_one(req: TuneRequest, mech: str, meta: dict[str, Any], on_mechanism: Any) -> TunedRecipe | None:
    study = open_study(req, mech, meta)
    rerun_cut_trials(study)
    failed = _count_fail(study)
    if count_trials(study, FINISHED) < req.trials:
        if req.backend == "ray":
            from dpbench.tuning.distributed import work_ray

            work_ray(req, mech, open_study(req, mech, meta), failed)  # seeded as a local worker would be
        elif req.jobs == 1:
            work(req, mech, meta, 0, failed)
        else:
            context = multiprocessing.get_context("spawn")
            workers = [context.Process(target=work, args=(req, mech, meta, i, failed)) for i in range(req.jobs)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
    recipe = best_recipe(req, mech, study)
    if on_mechanism is not None:
        on_mechanism(mech, study, recipe)
    return recipe


def rerun_cut_trials(study: optuna.Study) -> None:
    """Mark the trials a killed tune left running failed, and queue each one's parameters (those it had
    drawn) so that the next trials asked for run them again, wherever they were in the study. Parameters
    a finished trial already has are not queued (a study resumed before its sampler was seeded from its
    state may hold such a repeat, cut)."""
    done = [t.params for t in study.get_trials(deepcopy=False, states=FINISHED)]
    for left in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(left.number, state=optuna.trial.TrialState.FAIL)
        if left.params and left.params not in done:  # cut before it drew anything: a new draw stands for it
            study.enqueue_trial(left.params, user_attrs={"rerun_of": left.number})


def best_recipe(req: TuneRequest, mech: str, study: optuna.Study) -> TunedRecipe | None:
    """The best completed trial as a recipe for the dataset tuned for, with the study's budget."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    done = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    best = max(done, key=lambda t: (t.value, -t.number))
    p = best.params
    base = base_recipe(req, mech)
    return TunedRecipe(
        mech=mech, dataset=req.dataset, model=tuned_model(req, mech),
        eps=req.eps if get_mechanism(mech).private else math.inf, batch_size=int(p["batch_size"]),
        epochs=float(p["epochs"]), lr=float(p["lr"]), optimizer=base.optimizer, momentum=float(p["momentum"]),
        clip=float(p.get("clip", base.clip)), source=f"{req.study}#{best.number}", val_acc=float(best.value),
        trials=len(finished), pruned=len(finished) - len(done),
        cpu_s=round(sum(float(t.user_attrs.get("wall_s", 0.0)) for t in trials), 1),
        mech_params={k[4:]: v for k, v in p.items() if k.startswith("set.")})
