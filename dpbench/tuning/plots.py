"""Optuna's optimisation-history and parameter-importance plots (matplotlib), one pair per mechanism."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna


def save_study_plots(study_path: str, mechs: tuple[str, ...], title: str) -> list[Path]:
    """PNGs beside the study, ``<study>-<mech>-history.png`` and ``-importance.png``; returns their paths.

    The importance plot needs two completed trials that differ; a study without them gets the history only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    storage = f"sqlite:///{Path(study_path).resolve()}"
    written = []
    base = Path(study_path).with_suffix("")
    for mech in mechs:
        study = optuna.load_study(study_name=mech, storage=storage)
        done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            continue
        finished = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                       for t in study.get_trials(deepcopy=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
            ax = plot_optimization_history(study, target_name="validation accuracy")
            _title(ax, f"{mech}: {title}\n{len(done)} completed of {finished} finished trials "
                       f"(pruned trials have no value)")
            path = Path(f"{base}-{mech}-history.png")
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
            written.append(path)
            if len({t.value for t in done}) > 1:
                try:
                    ax = plot_param_importances(study, target_name="validation accuracy")
                except (ValueError, RuntimeError):
                    continue
                _title(ax, f"{mech}: hyperparameter importance (fANOVA)\n{title}")
                path = Path(f"{base}-{mech}-importance.png")
                ax.figure.savefig(path, dpi=120, bbox_inches="tight")
                plt.close(ax.figure)
                written.append(path)
    return written


def _title(ax, text: str) -> None:  # noqa: ANN001
    for loc in ("left", "center", "right"):  # Optuna's own title sits on one of them
        ax.set_title("", loc=loc)
    ax.set_title(text, fontsize=9)
