"""``tune --backend ray``: the driver keeps the study and asks for every trial; trials train as Ray tasks.

The driver samples a trial's configuration (so the sampler sees every finished trial, as in a local
tune), sends it to a task with a copy of the study's finished trials, and writes what comes back: the
trial's intermediate accuracies, its state, and (completed trials) its row in the trials CSV. The
task prunes with the same median pruner against that copy, so a remote trial is pruned as a local one
would be, except that trials finishing while it trains are not in its copy. No node needs the study's
SQLite file.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import optuna

from dpbench.config import RunConfig
from dpbench.distributed import MAX_RETRIES, connected
from dpbench.errors import BadInput
from dpbench.results import record_run
from dpbench.tuning.runner import (FINISHED, MAX_FAILURES, TuneRequest, count_trials, make_pruner, space_of,
                                   train_reporting, trial_config, trial_progress)

State = optuna.trial.TrialState


def trial_in_task(cfg: RunConfig, finished: list[optuna.trial.FrozenTrial], threads: int, number: int
                  ) -> dict[str, Any]:
    """The body of a Ray task: one trial (the study's trial ``number``) against an in-memory copy of its
    study's finished trials."""
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    copy = optuna.create_study(direction="maximize", pruner=make_pruner())
    copy.add_trials(finished)
    proxy = copy.ask()
    started = time.perf_counter()

    def outcome(state: str, **fields: Any) -> dict[str, Any]:
        return {"state": state, "reports": dict(copy.trials[-1].intermediate_values),
                "wall_s": time.perf_counter() - started, **fields}

    try:
        result = train_reporting(cfg, proxy, check_out=False, number=number)
    except optuna.TrialPruned as exc:
        return outcome("pruned", detail=str(exc))
    except BadInput as exc:
        return outcome("pruned", detail=f"invalid: {exc}")
    except Exception as exc:  # noqa: BLE001 - a crashing trial is recorded and the tune goes on
        return outcome("fail", detail=repr(exc))
    return outcome("complete", row=result.row, record=result.record)


def work_ray(req: TuneRequest, mech: str, study: optuna.Study, failures_before: int) -> None:
    """Run ``mech``'s trials as Ray tasks, ``req.jobs`` at a time, until it has ``req.trials`` finished ones or
    ``MAX_FAILURES`` failed in this invocation."""
    space = space_of(req, mech)
    with connected(req.address) as ray:
        remote = ray.remote(trial_in_task).options(num_cpus=req.cpus_per_run, num_gpus=req.gpus_per_run,
                                                   max_retries=MAX_RETRIES)
        threads = max(1, int(req.cpus_per_run))
        in_flight: dict[Any, optuna.Trial] = {}
        while True:
            while (len(in_flight) < req.jobs and count_trials(study, (State.FAIL,)) - failures_before < MAX_FAILURES
                   and count_trials(study, FINISHED + (State.RUNNING,)) < req.trials):
                trial = study.ask()
                options, params = space.sample(trial)
                try:
                    cfg = trial_config(req, mech, options, params, device="cuda" if req.gpus_per_run > 0 else None)
                except BadInput as exc:
                    trial.set_user_attr("pruned", f"invalid: {exc}")
                    study.tell(trial, state=State.PRUNED)
                    continue
                trial.set_user_attr("command", cfg.command())
                finished = study.get_trials(deepcopy=True, states=FINISHED)
                in_flight[remote.remote(cfg, finished, threads, trial.number)] = trial
            if not in_flight:
                return
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            trial = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # retries exhausted: the worker or node kept dying
                result = {"state": "fail", "detail": f"{type(exc).__name__}: {exc}", "reports": {}, "wall_s": math.nan}
            tell(study, trial, result, req.trials_csv)
            print(trial_progress(study, mech, trial.number, req.trials, req.jobs), file=sys.stderr, flush=True)


def tell(study: optuna.Study, trial: optuna.Trial, result: dict[str, Any], trials_csv: str) -> None:
    """Record a remote trial's outcome as a local trial's would be: reports, attributes, row, state."""
    for step, value in sorted(result["reports"].items()):
        trial.report(value, step)
    if math.isfinite(result["wall_s"]):
        trial.set_user_attr("wall_s", round(result["wall_s"], 3))
    if result["state"] == "complete":
        record_run(trials_csv, result["row"], result["record"])
        trial.set_user_attr("run_id", result["row"]["run_id"])
        study.tell(trial, float(result["row"]["test_acc"]), state=State.COMPLETE)
    elif result["state"] == "pruned":
        trial.set_user_attr("pruned", result["detail"])
        study.tell(trial, state=State.PRUNED)
    else:
        trial.set_user_attr("error", result["detail"])
        study.tell(trial, state=State.FAIL)
