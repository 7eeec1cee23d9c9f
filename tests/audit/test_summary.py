"""The audit summary figure and its dispatch from ``dpbench plot``."""

from __future__ import annotations

import math

import pandas as pd
from typer.testing import CliRunner

from dpbench.audit.summary import is_audit_csv, plot_audit_summary
from dpbench.cli import app


def audits() -> pd.DataFrame:
    return pd.DataFrame({
        "mech": ["dpsgd", "dpsgd", "modelmix", "nonprivate"], "eps_claimed": [1.0, 8.0, 8.0, math.inf],
        "eps_lower_bound": [0.3, 0.8, 1.5, 4.2], "threat_model": ["white"] * 4,
    })


def test_one_line_per_private_mechanism_the_diagonal_and_the_control():
    fig = plot_audit_summary(audits())
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:2] == ["dpsgd", "modelmix"] and "lower bound = claim" in labels
    dpsgd = ax.get_lines()[0]
    assert list(dpsgd.get_ydata()) == [0.3, 0.8]
    assert max(abs(x - c) for x, c in zip(dpsgd.get_xdata(), [1.0, 8.0])) < 0.1  # only a small visual shift
    control = [line for line in ax.get_lines() if line.get_label().startswith("non-private")]
    assert control and control[0].get_ydata()[0] == 4.2


def test_plot_command_recognises_an_audit_csv(tmp_path):
    path = tmp_path / "audit.csv"
    audits().to_csv(path, index=False)
    assert is_audit_csv(pd.read_csv(path))
    res = CliRunner().invoke(app, ["plot", str(path), "-o", str(tmp_path / "a.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a.png").exists() and (tmp_path / "a.svg").exists()
