"""The tuning behind tuned rows, for reports: each mechanism's budget and best validation accuracy."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def tuning_lines(df: pd.DataFrame) -> list[str]:
    """Markdown lines on the studies named in ``recipe_source`` (``<study>#<trial>``); none if no row is tuned."""
    if "recipe_source" not in df:
        return []
    tuned = df[df["recipe_source"].astype(str).str.contains("#", regex=False)]
    if tuned.empty:
        return []
    lines = ["## Tuning", "",
             "Rows trained from a tuned recipe (`dpbench tune`, validation split; tuning is not privacy-accounted, "
             "as in every seed paper). Budget per mechanism: finished trials (of which pruned) and the summed "
             "wall time of all its trials, one thread each.", "",
             "| mechanism | study | trials | pruned | failed | CPU-seconds | best validation accuracy | chosen trial |",
             "|---|---|---|---|---|---|---|---|"]
    for (mech, source), _ in tuned.groupby(["mech", "recipe_source"], sort=True):
        study_path, _, number = str(source).rpartition("#")
        if not Path(study_path).is_file():
            lines.append(f"| {mech} | `{study_path}` (not found) | - | - | - | - | - | {number} |")
            continue
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=mech, storage=f"sqlite:///{Path(study_path).resolve()}")
        trials = study.get_trials(deepcopy=False)
        state = optuna.trial.TrialState
        done = [t for t in trials if t.state == state.COMPLETE]
        pruned = sum(t.state == state.PRUNED for t in trials)
        failed = sum(t.state == state.FAIL for t in trials)
        cpu = sum(float(t.user_attrs.get("wall_s", 0.0)) for t in trials)
        best = max((t.value for t in done), default=float("nan"))
        lines.append(f"| {mech} | `{study_path}` | {len(done) + pruned} | {pruned} | {failed} | {cpu:.0f} | "
                     f"{100 * best:.2f} % | {number} |")
    return lines + [""]
