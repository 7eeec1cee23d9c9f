"""The tuning behind tuned rows, for reports: each mechanism's budget and best validation accuracy."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def tuning_lines(df: pd.DataFrame) -> list[str]:
    """Markdown lines on the studies named in ``recipe_source`` (``<study>#<trial>``); none if no row is tuned."""
    if "recipe_source" not in df:
        return []
    tuned = df[df["recipe_source"].astype(str).str.contains(r"#\d", regex=True)]
    if tuned.empty:
        return []
    lines = ["## Tuning", "",
             "Rows trained from a tuned recipe (`dpbench tune`, validation split; tuning is not privacy-accounted, "
             "as in every seed paper). Budget per mechanism: finished trials (of which pruned) and the summed "
             "wall time of all its trials, one thread each.", "",
             "| mechanism | study | trials | pruned | failed | CPU-seconds | best validation accuracy | chosen trial |",
             "|---|---|---|---|---|---|---|---|"]
    # a source is "<study>#<trial>", with " (<why>)" after it where run --recipes changed the tuned horizon
    parts = tuned["recipe_source"].astype(str).str.extract(r"^(?P<study>.*)#(?P<trial>\d+)(?: \((?P<why>.*)\))?$")
    tuned = tuned.assign(study=parts["study"], trial=parts["trial"], why=parts["why"].fillna(""))
    for (mech, study_path, trial), rows in tuned.groupby(["mech", "study", "trial"], sort=True):
        changes = sorted(set(rows["why"]) - {""})
        number = trial + "".join(f"; {why}" for why in changes)
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
