"""Plot and report of a fixture CSV: the expected artists, and numbers equal to a pandas groupby."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.plots import plot_results, save_plot
from dpbench.report import (build_csv, build_latex, build_report, cell_table, confidence_interval, group_means,
                            headline_frame, headline_legend, headline_table, paired_difference)
from dpbench.style import mech_colour, mech_marker
from dpbench.results import ALL_COLUMNS
from dpbench.tables import load_published


def fixture_csv(path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for mech, base in (("dpsgd", 0.90), ("dpis", 0.93), ("nonprivate", 0.99)):
        for eps in ((math.inf,) if mech == "nonprivate" else (1.0, 3.0, 8.0)):
            for seed in (0, 1, 2):
                acc = base - (0.05 / eps if math.isfinite(eps) else 0) + rng.normal(0, 0.005)
                row = {c: "" for c in ALL_COLUMNS}
                row.update(mech=mech, dataset="mnist", model="cnn_tanh", eps_target=eps, seed=seed,
                           test_acc=acc, steps=100, epochs=1.0, config_hash=f"{mech}-{eps}",
                           command=f"dpbench run --mech {mech} --eps {eps} --seed {seed}")
                rows.append(row)
    row = dict(rows[0], mech="dpsgd", eps_target=2.0, test_acc=0.08, config_hash="collapsed", seed=0)
    rows.append(row)
    df = pd.DataFrame(rows)
    df.to_csv(path, index=False)
    return pd.read_csv(path, dtype={"config_hash": str})


def test_plot_has_a_line_with_error_bars_per_mechanism_and_the_control(tmp_path):
    df = fixture_csv(tmp_path / "r.csv")
    fig = plot_results(df, published=load_published())
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert sorted(c.get_label() for c in bars) == ["dpis", "dpsgd"]
    dpis = next(c for c in bars if c.get_label() == "dpis")
    x, y = dpis.lines[0].get_data()
    expected = df[df.mech == "dpis"].groupby("eps_target")["test_acc"].mean() * 100
    np.testing.assert_allclose(np.asarray(x, dtype=float), expected.index.to_numpy(dtype=float))
    np.testing.assert_allclose(np.asarray(y, dtype=float), expected.to_numpy(dtype=float))
    assert dpis.has_yerr
    control = [l for l in ax.get_lines() if l.get_label().startswith("non-private")]
    assert len(control) == 1 and control[0].get_ydata()[0] == pytest.approx(100 * df[df.mech == "nonprivate"].test_acc.mean())
    assert "eps" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
    legend_labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("published: dpsgd") for t in legend_labels)


def test_plot_command_writes_png_and_svg(tmp_path):
    fixture_csv(tmp_path / "r.csv")
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "r.csv"), "-o", str(tmp_path / "p.png"), "--log-eps"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").stat().st_size > 10_000 and (tmp_path / "p.svg").exists()


def test_report_numbers_equal_a_pandas_groupby(tmp_path):
    df = fixture_csv(tmp_path / "r.csv")
    text = build_report(df)
    g = df.groupby(["mech", "eps_target", "config_hash"])["test_acc"].agg(["mean", "std", "count"])
    for (mech, eps, _), r in g.iterrows():
        if r["count"] > 1:
            cell = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
            assert cell in text, (mech, eps, cell)
    # paired difference to dpsgd at eps 3
    a = df[(df.mech == "dpis") & (df.eps_target == 3)].set_index("seed")["test_acc"]
    b = df[(df.mech == "dpsgd") & (df.eps_target == 3)].set_index("seed")["test_acc"]
    assert f"{100 * (a - b).mean():+.2f} (3 pairs)" in text
    assert paired_difference(a.reset_index(), b.reset_index()) == pytest.approx(((a - b).mean(), 3))


def test_report_flags_collapsed_runs_and_shows_published_and_commands(tmp_path):
    text = build_report(fixture_csv(tmp_path / "r.csv"))
    collapsed = next(line for line in text.splitlines() if line.startswith("| dpsgd | 2 |"))
    assert "⚠" in collapsed
    assert "96.82 (DPSUR CNN)" in text and "98.10 (end-to-end CNN)" in text
    assert "`dpbench run --mech dpis --eps 3.0 --seed S` (S in {0, 1, 2})" in text
    healthy = next(line for line in text.splitlines() if line.startswith("| dpis | 3 |"))
    assert "⚠" not in healthy


def test_plot_of_a_missing_file_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "none.csv")])
    assert res.exit_code == 2 and "none.csv" in res.output


def test_several_baseline_configurations_are_never_picked_silently(tmp_path):
    df = fixture_csv(tmp_path / "r.csv")
    other = df[(df.mech == "dpsgd") & (df.eps_target == 3)].assign(config_hash="dpsgd-lr2", test_acc=0.5)
    two = pd.concat([df, other.iloc[:1]])  # a second dpsgd configuration at eps 3, with fewer seeds
    dpis_line = lambda text: next(line for line in text.splitlines() if line.startswith("| dpis | 3 |"))  # noqa: E731
    assert "2 baseline configurations (dpsgd-3., dpsgd-lr)" in dpis_line(build_report(two))
    a = df[(df.mech == "dpis") & (df.eps_target == 3)].set_index("seed")["test_acc"]
    b = df[(df.mech == "dpsgd") & (df.eps_target == 3)].set_index("seed")["test_acc"]
    chosen = build_report(two, baseline_configs=("dpsgd-3",))
    assert f"{100 * (a - b).mean():+.2f} (3 pairs)" in dpis_line(chosen)
    assert "+" in dpis_line(build_report(two, baseline_configs=("dpsgd-lr2",))).split("|")[6]


def test_the_baseline_is_an_option(tmp_path):
    fixture_csv(tmp_path / "r.csv")
    res = CliRunner().invoke(app, ["report", str(tmp_path / "r.csv"), "--baseline", "dpis"])
    assert res.exit_code == 0, res.output
    assert "| Δ dpis |" in res.output
    line = next(x for x in res.output.splitlines() if x.startswith("| dpsgd | 3 |"))
    assert "(3 pairs)" in line and line.split("|")[6].strip().startswith("-")  # dpsgd trails dpis
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "r.csv"), "--baseline", "dpsdg"])
    assert bad.exit_code == 2 and "did you mean 'dpsgd'" in bad.output


def test_rows_pair_only_with_a_baseline_calibrated_by_the_same_accountant(tmp_path):
    df = fixture_csv(tmp_path / "r.csv")
    df["accountant"] = df["mech"].map({"dpsgd": "sgm-rdp", "dpis": "dpis-rdp", "nonprivate": "none"})
    by_pld = df[(df.mech == "dpsgd") & (df.eps_target == 3)].assign(config_hash="dpsgd-pld", accountant="sgm-pld",
                                                                       test_acc=0.95)
    dpis_pld = df[(df.mech == "dpis") & (df.eps_target == 3)].assign(config_hash="dpis-pld", accountant="dpis-pld",
                                                                      test_acc=0.96)
    text = build_report(pd.concat([df, by_pld, dpis_pld]))
    lines = [line for line in text.splitlines() if line.startswith("| dpis | 3")]
    by_rdp, = [line for line in lines if line.startswith("| dpis | 3 |")]
    pld, = [line for line in lines if line.startswith("| dpis | 3 (PLD) |")]
    a = df[(df.mech == "dpis") & (df.eps_target == 3)].set_index("seed")["test_acc"]
    b = df[(df.mech == "dpsgd") & (df.eps_target == 3)].set_index("seed")["test_acc"]
    assert f"{100 * (a - b).mean():+.2f} (3 pairs)" in by_rdp  # not "2 baseline configurations"
    assert "+1.00 (3 pairs)" in pld
    # an older CSV (no accountant column) still pairs as before
    assert f"{100 * (a - b).mean():+.2f} (3 pairs)" in build_report(df.drop(columns=["accountant"]))


def test_the_confidence_interval_of_the_paired_difference_is_scipys(tmp_path):
    from scipy import stats

    df = fixture_csv(tmp_path / "r.csv")
    cells = cell_table(df)
    dpis = cells[(cells.mech == "dpis") & (cells.eps_target == 3)].iloc[0]
    a = df[(df.mech == "dpis") & (df.eps_target == 3)].set_index("seed")["test_acc"]
    b = df[(df.mech == "dpsgd") & (df.eps_target == 3)].set_index("seed")["test_acc"]
    expected = stats.ttest_1samp((a - b).to_numpy(), 0.0).confidence_interval(0.95)
    assert (dpis["diff_ci_low"], dpis["diff_ci_high"]) == pytest.approx((expected.low, expected.high), rel=1e-9)
    assert dpis["diff"] == pytest.approx((a - b).mean()) and dpis["pairs"] == 3
    assert f"[{100 * expected.low:+.2f}, {100 * expected.high:+.2f}]" in build_report(df)
    assert confidence_interval(np.array([0.01]))[0] != confidence_interval(np.array([0.01]))[0]  # one pair: NaN


def test_tuned_rows_pair_with_the_baseline_tuned_in_the_same_study(tmp_path):
    df = fixture_csv(tmp_path / "r.csv")
    df = df[df.eps_target == 3].copy()
    df["recipe_source"] = df["mech"].map(lambda m: f"results/tuning/s.db#{ {'dpsgd': 0, 'dpis': 4}.get(m, 1)}")
    df.loc[df.mech == "dpis", "steps"] = 50  # its own tuned horizon
    other_study = df[df.mech == "dpsgd"].assign(config_hash="dpsgd-other", recipe_source="elsewhere.db#2",
                                                 test_acc=0.5)
    cells = cell_table(pd.concat([df, other_study]))
    dpis = cells[cells.mech == "dpis"].iloc[0]
    a = df[df.mech == "dpis"].set_index("seed")["test_acc"]
    b = df[df.mech == "dpsgd"].set_index("seed")["test_acc"]
    assert dpis["pairs"] == 3 and dpis["diff"] == pytest.approx((a - b).mean())
    untuned = df.drop(columns=["recipe_source"])  # other rows pair only at the same steps
    assert cell_table(untuned).query("mech == 'dpis'")["pairs"].iloc[0] == 0


def test_the_headline_marks_the_best_private_mean_of_each_column_in_every_format(tmp_path):
    df = fixture_csv(tmp_path / "r.csv")
    df = df[df.config_hash != "collapsed"]
    cells = cell_table(df)
    head = headline_table(cells)
    best = head[head.best]
    means = df[np.isfinite(df.eps_target)].groupby(["eps_target", "mech"])["test_acc"].mean()
    assert sorted(best.eps_target) == [1.0, 3.0, 8.0]
    assert all(best.set_index("eps_target")["mech"][e] == means[e].idxmax() for e in (1.0, 3.0, 8.0))
    assert not head[head.mech == "nonprivate"].best.any()
    wide = headline_frame(cells)
    assert set(wide.index) == {"dpsgd", "nonprivate", "dpis"}
    control = df[df.mech == "nonprivate"].test_acc
    assert wide.loc["nonprivate", ("mnist/cnn_tanh", "eps inf")] == \
        f"{100 * control.mean():.2f} ± {100 * control.std():.2f}"
    assert wide.loc["nonprivate", ("mnist/cnn_tanh", "eps 1")] == "-"
    winner = means[3.0].idxmax()
    assert wide.loc[winner, ("mnist/cnn_tanh", "eps 3")].startswith("**")
    latex = build_latex(df)
    assert "\\toprule" in latex and "\\textbf{" in latex and "$\\pm$" in latex and "\\begin{table}" in latex
    table = pd.read_csv(io.StringIO(build_csv(df)))
    assert len(table) == len(group_means(df)) and table["best"].sum() == 3
    np.testing.assert_allclose(table.sort_values(["mech", "eps_target"])["mean"],
                               group_means(df).sort_values(["mech", "eps_target"])["mean"])


def test_the_headline_legend_gives_each_mechanisms_horizons_once_and_readably():
    cells = pd.DataFrame({"mech": ["dpsgd", "dpsgd", "ged", "ged", "modelmix"],
                          "epochs": [40.0, 40.0, 20.0, 40.0, 800 * 8192 / 60000]})
    legend = headline_legend(cells)
    assert "Epochs per mechanism: dpsgd 40, ged 20/40, modelmix 109.2." in legend
    # two step-counted runs whose epochs differ only past the fourth digit are one horizon
    cells.loc[4, "epochs"] += 1e-9
    cells.loc[5] = ["modelmix", 800 * 8192 / 60000]
    assert "modelmix 109.2." in headline_legend(cells)


def test_report_reads_several_csvs_and_refuses_an_unknown_format(tmp_path):
    df = fixture_csv(tmp_path / "r.csv")
    df[df.mech == "dpsgd"].assign(dataset="fmnist").to_csv(tmp_path / "f.csv", index=False)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "r.csv"), str(tmp_path / "f.csv"), "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert set(pd.read_csv(io.StringIO(res.output))["dataset"]) == {"mnist", "fmnist"}
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "r.csv"), "--format", "html", "-o", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "'html'" in bad.output and not (tmp_path / "o").exists()


def test_plot_keeps_colours_across_figures_opens_single_seeds_and_never_joins_horizons(tmp_path):
    df = fixture_csv(tmp_path / "r.csv")
    df = df[df.config_hash != "collapsed"].copy()
    df.loc[(df.mech == "dpis") & (df.eps_target == 8), "epochs"] = 2.0  # another horizon
    single = df[(df.mech == "dpsgd") & (df.eps_target == 1) & (df.seed > 0)].index
    df = df.drop(single)  # dpsgd at eps 1: one seed
    fig = plot_results(df)
    (ax,) = fig.axes
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert set(bars) == {"dpsgd (1 ep)", "dpis (1 ep)", "dpis (2 ep)"}
    assert list(bars["dpis (1 ep)"].lines[0].get_xdata()) == [1.0, 3.0]  # the 2-epoch point is not joined
    assert list(bars["dpis (2 ep)"].lines[0].get_xdata()) == [8.0]
    # dpis's points, one colour and marker at two horizons, each name theirs; dpsgd's (one horizon) do not
    notes = sorted((t.get_text(), t.xy[0]) for t in ax.texts)
    assert notes == [("1 ep", 1.0), ("1 ep", 3.0), ("2 ep", 8.0)]
    assert all(t.get_color() == mech_colour("dpis") for t in ax.texts)
    open_points = [c for c in ax.collections if isinstance(c, PathCollection)
                   and c.get_facecolors()[0][:3].tolist() == [1, 1, 1]]
    assert len(open_points) == 1 and open_points[0].get_offsets()[0][0] == 1.0
    title = ax.get_title()
    assert "cnn_tanh" in title and "horizon per mechanism" in title and "1 to 3 seeds (open marker: 1 seed)" in title
    only_dpis = plot_results(df[df.mech != "dpsgd"])
    colour = lambda f, label: next(c for c in f.axes[0].containers if c.get_label() == label).lines[0].get_color()  # noqa: E731
    assert colour(fig, "dpis (1 ep)") == colour(only_dpis, "dpis (1 ep)") == mech_colour("dpis")
    assert mech_colour("dpis") != mech_colour("dpsgd") and mech_marker("dpis") != mech_marker("dpsgd")


def test_a_headline_of_several_pairs_gives_the_horizons_of_each_pair():
    cells = pd.DataFrame({"dataset": ["mnist", "mnist", "mnist", "cifar10", "cifar10", "cifar10"],
                          "model": ["cnn_tanh"] * 3 + ["scatter_linear"] * 3,
                          "mech": ["dpsgd", "ged", "ged", "dpsgd", "ged", "psac"],
                          "epochs": [40.0, 20.0, 40.0, 10.0, 10.0, 40.0]})
    legend = headline_legend(cells)
    assert ("Epochs per pair: CIFAR-10 scatter_linear: dpsgd, ged 10; psac 40. "
            "MNIST cnn_tanh: ged 20/40; dpsgd 40.") in legend
    assert "Epochs per mechanism" not in legend
    # a single pair keeps the short form
    assert "Epochs per mechanism: dpsgd 10, ged 10, psac 40." in headline_legend(cells[cells.dataset == "cifar10"])


def test_a_figure_redrawn_from_the_same_rows_is_byte_identical(tmp_path):
    df = fixture_csv(tmp_path / "r.csv")
    first = save_plot(df, tmp_path / "a" / "plot.png", with_published=True)
    second = save_plot(df, tmp_path / "b" / "plot.png", with_published=True)
    assert [p.suffix for p in first] == [".png", ".svg"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    svg = first[1].read_text()
    assert "<dc:date>" not in svg and "<svg" in svg
    # the same rows with one accuracy changed must not give the same figure
    changed = save_plot(df.assign(test_acc=df.test_acc.where(df.index != 0, 0.5)), tmp_path / "c" / "plot.png")
    assert changed[1].read_bytes() != save_plot(df, tmp_path / "d" / "plot.png")[1].read_bytes()
