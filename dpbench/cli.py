"""The ``dpbench`` command line: parses flags, builds a RunConfig and calls the library."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dpbench.errors import BadInput

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmark DP-SGD and its variants at matched, correctly accounted privacy.")
out = Console()
err = Console(stderr=True)


def fail(exc: BadInput) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


# Options that run and audit share, defined once.
MechOption = Annotated[str, typer.Option("--mech", help="mechanism name (see 'dpbench ls mechanisms')")]
DatasetOption = Annotated[Optional[str], typer.Option(help="dataset name (default: mnist)")]
ModelOption = Annotated[Optional[str], typer.Option(help="model name (default: from the recipe)")]
DeltaOption = Annotated[Optional[float], typer.Option(help="target delta (default: 1e-5)")]
EpochsOption = Annotated[Optional[float], typer.Option(help="nominal epochs: T = floor(E*N/B) Poisson steps")]
StepsOption = Annotated[Optional[int], typer.Option(help="number of steps T (instead of --epochs, not with it)")]
BatchSizeOption = Annotated[Optional[int], typer.Option(help="expected (logical) batch size B; q = B/N")]
PhysicalBatchOption = Annotated[Optional[int], typer.Option(help="chunk size for memory; changes no result")]
LrOption = Annotated[Optional[float], typer.Option(help="learning rate")]
OptimizerOption = Annotated[Optional[str], typer.Option(help="sgd or adam")]
MomentumOption = Annotated[Optional[float], typer.Option(help="SGD momentum")]
ClipOption = Annotated[Optional[float], typer.Option(help="clipping bound C")]
DeviceOption = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cpu)")]
DataDirOption = Annotated[Optional[str], typer.Option(help="offline data folder (or $DPBENCH_DATA)")]
SetOption = Annotated[list[str], typer.Option("--set", help="mechanism parameter key=value (repeatable)")]
ForceOption = Annotated[bool, typer.Option("--force", help="allow delta >= 1/N")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="no progress bar or progress lines")]
GradSampleOption = Annotated[Optional[str], typer.Option(help=(
    "per-sample gradients: fast (book-keeping: norms without materialising them where a layer allows; the "
    "default) or reference (Opacus' per-sample gradients); both give the same update up to float rounding"))]

ACCOUNTANT_HELP = (
    "what calibrates the noise and gives eps_spent: rdp (the mechanism's RDP curve, as in the seed papers; the "
    "default), pld (privacy loss distributions, Google's dp_accounting: the tightest) or prv (Opacus). pld and prv "
    "need a release made of sampled Gaussians: modelmix and ged take rdp only")
AccountantOption = Annotated[Optional[str], typer.Option(help=ACCOUNTANT_HELP)]
BackendOption = Annotated[str, typer.Option(help=(
    "local (processes on this machine) or ray (Ray tasks; needs the ray extra: pip install 'dpbench\\[ray]')"))]
AddressOption = Annotated[Optional[str], typer.Option(help=(
    "with --backend ray: the cluster to join (e.g. 10.0.0.1:6379, as printed by 'ray start --head'); "
    "default: start a local Ray instance"))]
CpusPerRunOption = Annotated[float, typer.Option(help="with --backend ray: CPUs each run requests (its torch threads)")]
GpusPerRunOption = Annotated[float, typer.Option(help=(
    "with --backend ray: GPUs each run requests; a fraction (0.25) lets several runs share one GPU"))]


#: The flags of run and audit that become RunConfig fields.
TRAINING_FLAGS = ("mech", "dataset", "model", "eps", "delta", "epochs", "steps", "batch_size", "physical_batch_size",
                  "lr", "optimizer", "momentum", "clip", "seed", "secure", "device", "data_dir", "force", "grad_sample",
                  "accountant")


def _training_options(flags: dict[str, Any], out: str | None) -> dict[str, Any]:
    """A command's flags (its ``locals()``) as ``resolve`` takes them: ``None`` = not given."""
    options = {k: flags[k] for k in TRAINING_FLAGS if k in flags}
    for switch in ("secure", "force"):
        if switch in options:
            options[switch] = options[switch] or None
    return {**options, "out": out}


@app.command()
def run(
    mech: MechOption,
    dataset: DatasetOption = None,
    model: ModelOption = None,
    eps: Optional[float] = typer.Option(None, help="target epsilon; 'inf' = non-private"),
    delta: DeltaOption = None,
    epochs: EpochsOption = None,
    steps: StepsOption = None,
    batch_size: BatchSizeOption = None,
    physical_batch_size: PhysicalBatchOption = None,
    grad_sample: GradSampleOption = None,
    accountant: AccountantOption = None,
    lr: LrOption = None,
    optimizer: OptimizerOption = None,
    momentum: MomentumOption = None,
    clip: ClipOption = None,
    seed: Optional[int] = typer.Option(None, help="seed of every generator (default: 0)"),
    secure: bool = typer.Option(False, "--secure", help=(
        "seed every generator of the run (noise, sampling, masks, draws) from OS entropy, never recorded, and draw "
        "Gaussian noise with Opacus' floating-point-attack hardening (sums of draws). Protects against an adversary who knows "
        "--seed and the code; does NOT make the generators cryptographic (they are torch's Mersenne Twister "
        "PRNGs, OS-seeded: Opacus' CSPRNG needs torchcsprng, which has no release for torch 2.x), and GED's "
        "Student-t/Laplace noise and DPIS's normaliser noise get no floating-point hardening. With --resume a "
        "secure run continues only its own secure checkpoint and never a reproducible run's: it starts afresh "
        "instead")),
    device: DeviceOption = None,
    data_dir: DataDirOption = None,
    out_csv: Optional[str] = typer.Option(None, "--out", help="results CSV (default: results/runs.csv)"),
    sets: SetOption = [],
    config: Optional[str] = typer.Option(None, help="TOML file with the same options"),
    recipes: Optional[str] = typer.Option(None, "--recipes", help=(
        "tuned recipes (the TOML of 'dpbench tune'): the entry for this mechanism, dataset and model at this eps, "
        "else at the nearest tuned eps (said on stderr), replaces the built-in recipe; flags still override it")),
    force: ForceOption = False,
    quiet: QuietOption = False,
    resume: bool = typer.Option(False, "--resume", help="continue from this configuration's checkpoint "
                                "(<folder of --out>/checkpoints/; --secure runs keep their own)"),
    checkpoint_every: float = typer.Option(300.0, help="seconds between checkpoints"),
    checkpoint_dir: Optional[str] = typer.Option(None, "--checkpoint-dir", help=(
        "folder of this run's checkpoint (default: <folder of --out>/checkpoints/)")),
) -> None:
    """Train one model under (eps, delta)-DP and append one row to the results CSV.

    Progress goes to stderr: a bar on a terminal, else a line 'step S/T  loss L  N samples/s  ETA ...'
    within 10 s of the first step and every 30 s after (--quiet: none).
    """
    from dpbench.config import parse_sets, resolve
    from dpbench.engine import run as run_engine

    options = _training_options(locals(), out_csv)
    options["recipes"] = recipes
    try:
        options["mech_params"] = parse_sets(sets)
        cfg = resolve(options, config)
        _warn_ignored_eps(cfg.mech, eps)
        if not checkpoint_every > 0:
            raise BadInput(f"--checkpoint-every {checkpoint_every}: must be a positive number of seconds")
        row = run_engine(cfg, show_progress=not quiet, resume=resume, checkpoint_every_s=checkpoint_every,
                         checkpoint_dir=checkpoint_dir)
    except BadInput as exc:
        raise fail(exc)
    _print_summary(row, cfg.out)


def _warn_ignored_eps(mech: str, eps: float | None) -> None:
    from dpbench.config import is_private

    if not is_private(mech) and eps is not None and not math.isinf(eps):
        err.print(f"[yellow]warning:[/] --eps {eps:g} is ignored: {mech} trains without clipping or noise "
                  "(eps = inf)", highlight=False, soft_wrap=True)


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else format(v, spec)
    return str(v)


def _print_summary(row: dict[str, Any], path: str) -> None:
    t = Table(title=f"{row['mech']} on {row['dataset']} ({row['model']})", show_header=False)
    t.add_row("test accuracy", f"{100 * row['test_acc']:.2f} %")
    t.add_row("eps spent / target", f"{_fmt(row['eps_spent'])} / {_fmt(row['eps_target'])}  (delta {row['delta']:g}, {row['accountant']})")
    t.add_row("eps RDP / PLD / PRV / classic", " / ".join(_fmt(row.get(k)) for k in ("eps_rdp", "eps_pld", "eps_prv",
                                                                                    "eps_classic")))
    t.add_row("noise multiplier", _fmt(row["noise_multiplier"]))
    rates = f"q = {row['sample_rate']:.4g}"
    if row.get("release_rate") is not None and row["release_rate"] != row["sample_rate"]:
        rates += f", release rate {row['release_rate']:.4g}"
    t.add_row("steps (epochs)", f"{row['steps']} ({row['epochs']:.4g}), {rates}")
    t.add_row("time", f"{row['wall_s']:.1f} s, {row['samples_per_s']:.0f} samples/s, peak {row['peak_mem_mb']:.0f} MB")
    t.add_row("row appended to", path)
    t.add_row("command", row["command"])
    out.print(t)


@app.command()
def account(
    mech: str = typer.Option(..., "--mech"),
    dataset: Optional[str] = typer.Option(None, help="dataset whose size N and recipe to use (default: mnist)"),
    n: Optional[int] = typer.Option(None, "--n", help="dataset size N (instead of --dataset)"),
    model: Optional[str] = typer.Option(None, help="model whose recipe gives B, C and epochs (default: the dataset's)"),
    batch_size: Optional[int] = typer.Option(None, help="expected batch size B (default: recipe)"),
    clip: Optional[float] = typer.Option(None, help="clipping bound C (default: recipe) (changes eps only for modelmix)"),
    epochs: Optional[float] = typer.Option(None, help="nominal epochs (default: recipe)"),
    steps: Optional[int] = typer.Option(None, help="number of steps T (instead of --epochs, not with it)"),
    eps: Optional[float] = typer.Option(None, help="target eps: print the calibrated noise"),
    sigma: Optional[float] = typer.Option(None, help="noise multiplier: print the eps spent"),
    delta: float = typer.Option(1e-5),
    accountant: str = typer.Option("rdp", help=ACCOUNTANT_HELP),
    sets: list[str] = typer.Option([], "--set", help="mechanism parameter key=value (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object only"),
) -> None:
    """Print the calibrated noise for a target eps, or the eps of a given noise, by every accountant that
    applies. Trains nothing."""
    from dpbench.config import parse_sets
    from dpbench.pipeline import plan_accounting

    try:
        plan = plan_accounting(mech, params=parse_sets(sets), dataset=dataset, n=n, model=model,
                               batch_size=batch_size, clip=clip, epochs=epochs, steps=steps, eps=eps, sigma=sigma,
                               delta=delta, accountant=accountant)
    except BadInput as exc:
        raise fail(exc)
    report, size, b, c, q = plan.privacy, plan.size, plan.batch_size, plan.clip, plan.q
    payload = report.as_json()
    payload.update({"n": size, "batch_size": b, "clip": c,
                    "eps_target": "inf" if eps is not None and math.isinf(eps) else eps})
    if as_json:
        typer.echo(json.dumps(payload))
        return
    t_ = Table(title=f"{mech}: N={size}, B={b}, C={_fmt(c)}, q={q:.4g}, T={report.steps}, delta={delta:g}",
               show_header=False)
    t_.add_row("noise multiplier", _fmt(report.noise_multiplier))
    if report.release_rate != report.sample_rate:
        t_.add_row("release rate (differing record enters the release)", _fmt(report.release_rate))
    what = "calibrated by" if eps is not None else "accounted by"
    t_.add_row(f"eps ({report.accountant}: {what} {report.calibrated_by})", _fmt(report.eps))
    if report.by_accountant:
        labels = {"rdp": f"RDP, Opacus conversion, at alpha {report.alpha:g}", "pld": "PLD (dp_accounting)",
                  "prv": "PRV (Opacus)"}
        for name, value in report.by_accountant.items():
            t_.add_row(f"  eps by {labels[name]}", _fmt(value) if value is not None else "- (does not apply)")
    t_.add_row("eps (RDP curve, classic conversion)", _fmt(report.eps_classic))
    if not report.accountant.startswith("sgm-"):
        t_.add_row("eps (plain sampled-Gaussian RDP of the same noise)", _fmt(report.eps_rdp))
    for key, value in report.extras.items():
        t_.add_row(key, _fmt(value))
    out.print(t_)


def _split(text: Optional[str], conv=str) -> Optional[list]:
    if text is None:
        return None
    try:
        return [conv(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"{text!r}: expected a comma-separated list") from None


@app.command()
def sweep(
    spec_file: Optional[str] = typer.Argument(None, help="sweep spec (TOML) with \\[grid], \\[fixed], \\[recipe.<mech>]"),
    mech: Optional[str] = typer.Option(None, help="comma-separated mechanisms (patterns allowed, '*' = all)"),
    dataset: Optional[str] = typer.Option(None, help="comma-separated datasets"),
    model: Optional[str] = typer.Option(None, help="comma-separated models"),
    eps: Optional[str] = typer.Option(None, help="comma-separated eps targets, e.g. 1,2,3,4,8"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds, e.g. 0,1,2"),
    epochs: Optional[float] = typer.Option(None, help="epochs for every run (overrides the spec)"),
    accountant: AccountantOption = None,
    recipes: Optional[str] = typer.Option(None, "--recipes", help="tuned recipes (dpbench tune) for every "
                                          "configuration (overrides the spec's recipes key)"),
    devices: Optional[str] = typer.Option(None, help="one worker per device, e.g. cuda:0,cuda:1"),
    jobs: int = typer.Option(1, help="CPU worker processes (ignored with --devices; with --backend ray the cluster's "
                                     "resources decide)"),
    data_dir: Optional[str] = typer.Option(None, help="offline data folder (or $DPBENCH_DATA)"),
    out_csv: Optional[str] = typer.Option(None, "--out", help="results CSV (default: spec's out, else results/sweep.csv)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the configurations and exit"),
    backend: BackendOption = "local",
    address: AddressOption = None,
    cpus_per_run: CpusPerRunOption = 1.0,
    gpus_per_run: GpusPerRunOption = 0.0,
    checkpoint_dir: Optional[str] = typer.Option(None, "--checkpoint-dir", help=(
        "checkpoints of the runs (default: <folder of --out>/checkpoints/); with --backend ray, storage that "
        "every node reaches, so that a retried run resumes")),
) -> None:
    """Run a grid of configurations, skipping those already in the CSV; resumable and crash-safe.

    --backend ray runs each configuration as a Ray task (a local instance, or the cluster at --address);
    the driver alone writes the CSV, and a task whose node dies is retried, so every configuration gets
    exactly one row.
    """
    from dpbench.distributed import check_backend
    from dpbench.sweep import SweepSpec, expand, read_spec, run_sweep

    try:
        spec = read_spec(spec_file) if spec_file else SweepSpec(grid={})
        for key, values in (("mech", _split(mech)), ("dataset", _split(dataset)), ("model", _split(model)),
                            ("eps", _split(eps, float)), ("seed", _split(seeds, int))):
            if values is not None:
                spec.grid[key] = values
        if epochs is not None:
            spec.fixed["epochs"] = epochs
            spec.fixed.pop("steps", None)
        if data_dir is not None:
            spec.fixed["data_dir"] = data_dir
        if accountant is not None:
            spec.fixed["accountant"] = accountant
        if recipes is not None:
            spec.recipes = recipes
        out_path = out_csv or spec.fixed.pop("out", None) or "results/sweep.csv"
        spec.fixed.pop("out", None)
        if jobs < 1:
            raise BadInput(f"--jobs {jobs}: must be at least 1")
        device_list = _split(devices)
        if backend == "ray" and device_list:
            raise BadInput(f"--devices {devices}: the local backend's; with --backend ray give --gpus-per-run "
                           f"(Ray assigns the GPUs)")
        if device_list:
            from dpbench.pipeline import resolve_device

            for d in device_list:
                resolve_device(d)
        check_backend(backend, address, cpus_per_run, gpus_per_run)
        configs = expand(spec)
        if dry_run:
            for c in configs:
                out.print(c.command(), highlight=False, soft_wrap=True)
            return
        if backend == "ray":
            from dpbench.distributed import run_sweep_ray

            outcomes = run_sweep_ray(configs, out_path, address=address, cpus_per_run=cpus_per_run,
                                     gpus_per_run=gpus_per_run, checkpoint_dir=checkpoint_dir)
        else:
            outcomes = run_sweep(configs, out_path, jobs=jobs, devices=device_list, checkpoint_dir=checkpoint_dir)
    except BadInput as exc:
        raise fail(exc)
    if any(not o.ok for o in outcomes):
        raise typer.Exit(code=1)


def _lr_ranges(text: Optional[str]) -> tuple[tuple[str, float, float], ...]:
    """``sgd=1:1000,adam=1e-3:1`` as ((optimizer, low, high), ...)."""
    ranges = []
    for item in _split(text) or []:
        optimizer, _, bounds = item.partition("=")
        low, _, high = bounds.partition(":")
        try:
            ranges.append((optimizer.strip(), float(low), float(high)))
        except ValueError:
            raise BadInput(f"--lr-range {item}: expected OPTIMIZER=LOW:HIGH, e.g. sgd=1:1000") from None
    return tuple(ranges)


@app.command()
def tune(
    mech: str = typer.Option(..., "--mech", help="comma-separated mechanisms; each gets the same trials and space"),
    dataset: str = typer.Option(..., help="dataset to tune for (mnist); trials train on its validation split "
                                          "(mnist_val) and never read its test split"),
    eps: float = typer.Option(..., help="target epsilon of every trial (calibrated as 'run' does)"),
    model: Optional[str] = typer.Option(None, help="model (default: each mechanism's recipe)"),
    trials: int = typer.Option(12, help="finished (completed or pruned) trials per mechanism, over all invocations"),
    study: Optional[str] = typer.Option(None, help="Optuna study (SQLite; default: <--out without .toml>.db)"),
    out_toml: str = typer.Option("results/tuning/recipes.toml", "--out", help="recipes TOML (entries for other "
                                 "datasets, models or eps already in it are kept)"),
    jobs: int = typer.Option(1, help="trials in parallel (processes, one thread each; Ray tasks with --backend ray)"),
    seed: int = typer.Option(0, help="seed of the sampler and of every trial's run"),
    accountant: AccountantOption = None,
    batch_sizes: str = typer.Option("256,512,1024,2048", help="batch sizes searched (shared by every mechanism)"),
    epoch_choices: str = typer.Option("5,10,20", help="epochs searched (shared by every mechanism)"),
    lr_range: Optional[str] = typer.Option(None, "--lr-range", help="learning-rate range of an optimizer, replacing "
                                           "the default (sgd 0.01-30, adam 1e-4-0.1) for every mechanism that uses "
                                           "it: sgd=1:1000 (comma-separated for several)"),
    data_dir: DataDirOption = None,
    backend: BackendOption = "local",
    address: AddressOption = None,
    cpus_per_run: CpusPerRunOption = 1.0,
    gpus_per_run: GpusPerRunOption = 0.0,
) -> None:
    """Equal-budget hyperparameter search (Optuna, TPE sampler, median pruner) on the validation split.

    Searches lr and C (log scale), batch size, epochs, momentum {0, 0.9} and each mechanism's declared
    tunable parameters, cut by its declared constraints. Writes the best configuration per mechanism to
    --out, the study beside it, one row per completed trial to <study>.trials.csv. A killed tune resumes;
    a finished one trains nothing. Tuning is NOT privacy-accounted (as in every seed paper): only each
    final run's eps is. --backend ray runs the trials as Ray tasks (--jobs at a time); this process keeps
    the study.
    """
    from dpbench.tuning.recipes_file import read_recipes, write_recipes
    from dpbench.tuning.runner import TuneRequest, tune as run_tune
    from dpbench.tuning.space import SharedSpace

    try:
        mechs = tuple(_split(mech) or [])
        if not mechs:
            raise BadInput("--mech: name at least one mechanism")
        if not out_toml.endswith(".toml"):
            raise BadInput(f"--out {out_toml}: must be a .toml file")
        shared = SharedSpace(batch_sizes=tuple(_split(batch_sizes, int) or ()),
                             epochs=tuple(_split(epoch_choices, float) or ()), lr_ranges=_lr_ranges(lr_range))
        from dpbench.distributed import check_backend

        check_backend(backend, address, cpus_per_run, gpus_per_run)
        req = TuneRequest(mechs=mechs, dataset=dataset, model=model, eps=eps, trials=trials,
                          study=study or str(Path(out_toml).with_suffix(".db")), out=out_toml, jobs=jobs, seed=seed,
                          accountant=accountant or "rdp", data_dir=data_dir, shared=shared, backend=backend,
                          address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)
        kept = read_recipes(out_toml) if Path(out_toml).exists() else []

        def done(name, study_, recipe) -> None:  # noqa: ANN001
            from dpbench.tuning.runner import FINISHED, MAX_FAILURES

            finished = len(study_.get_trials(deepcopy=False, states=FINISHED))
            if finished < trials:
                err.print(f"[yellow]warning:[/] {name} stopped at {finished} of {trials} trials after {MAX_FAILURES} "
                          f"failed ones (their errors and commands are in the study's trial attributes): its budget "
                          f"is not the others'", highlight=False, soft_wrap=True)
            if recipe is None:
                out.print(f"{name}: no completed trial (all pruned or failed); no recipe", highlight=False)
            else:
                out.print(f"{name}: best validation accuracy {100 * recipe.val_acc:.2f} % ({recipe.source}); "
                          f"{recipe.trials} trials, {recipe.pruned} pruned, {recipe.cpu_s:.0f} s", highlight=False)

        recipes = run_tune(req, on_mechanism=done)
    except BadInput as exc:
        raise fail(exc)
    replaced = {(r.mech, r.dataset, r.model, r.eps) for r in recipes}
    kept = [r for r in kept if (r.mech, r.dataset, r.model, r.eps) not in replaced]
    header = (f"written by: dpbench tune {' '.join(sys.argv[2:])}\n"
              "tuned on the validation split; tuning is not privacy-accounted")
    write_recipes(out_toml, kept + recipes, header)
    from dpbench.tuning.plots import save_study_plots

    plots = save_study_plots(req.study, mechs, f"{dataset} (validation split), eps {eps:g}, "
                                               f"{req.trials} trials per mechanism")
    out.print(f"wrote {out_toml} ({len(recipes)} tuned recipes); study {req.study}; trials {req.trials_csv}; "
              f"{len(plots)} plots beside the study", highlight=False)


@app.command()
def plot(
    csv_file: str = typer.Argument(..., help="results CSV"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="PNG path (an SVG is written beside it)"),
    published: bool = typer.Option(False, "--published", help="add published reference points"),
    log_eps: bool = typer.Option(False, "--log-eps", help="logarithmic eps axis"),
    title: Optional[str] = typer.Option(None, help="figure title"),
) -> None:
    """Plot accuracy against eps, one line per mechanism, mean +- std over seeds."""
    from dpbench.plots import save_plot
    from dpbench.tables import load_results

    try:
        import pandas as pd

        from dpbench.audit.summary import is_audit_csv, save_audit_summary

        if Path(csv_file).exists() and is_audit_csv(audit := pd.read_csv(csv_file)):
            paths = save_audit_summary(audit, output or str(Path(csv_file).with_suffix(".png")), title=title)
            out.print("wrote " + ", ".join(map(str, paths)))
            return
        df = load_results(csv_file)
        paths = save_plot(df, output or str(Path(csv_file).with_suffix(".png")), with_published=published,
                          log_eps=log_eps, title=title)
    except BadInput as exc:
        raise fail(exc)
    out.print("wrote " + ", ".join(map(str, paths)))


@app.command()
def report(
    csv_files: list[str] = typer.Argument(..., help="results CSV(s); several are read as one table"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="output path (default: stdout)"),
    fmt: str = typer.Option("md", "--format", help="md (headline + detail per dataset), latex (the headline "
                            "table, pandas Styler) or csv (every cell, unrounded)"),
    title: str = typer.Option("dpbench report", help="report title (LaTeX: the caption's first sentence)"),
    baseline: str = typer.Option("dpsgd", help="mechanism every other one is paired with, seed by seed"),
    baseline_config: list[str] = typer.Option([], "--baseline-config", help=(
        "config_hash (or a prefix) of the baseline configuration to pair with, where the CSV holds several "
        "(repeatable: one per dataset/model/eps/steps cell)")),
) -> None:
    """Tables of mean +- std over seeds, the paired difference to a baseline with its 95% CI, eps, published numbers."""
    from dpbench.mechanisms import MECHANISMS
    from dpbench.report import FORMATS, build_csv, build_latex, build_report
    from dpbench.tables import load_results

    try:
        if fmt not in FORMATS:
            raise BadInput(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        MECHANISMS.entry(baseline)  # a typo fails with a "did you mean"
        import pandas as pd

        df = pd.concat([load_results(f) for f in csv_files], ignore_index=True)
        configs = tuple(baseline_config)
        if fmt == "md":
            text = build_report(df, title=title, baseline=baseline, baseline_configs=configs)
        elif fmt == "latex":
            text = build_latex(df, title=title, baseline=baseline, baseline_configs=configs)
        else:
            text = build_csv(df, baseline=baseline, baseline_configs=configs)
    except BadInput as exc:
        raise fail(exc)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        out.print(f"wrote {output}")
    else:
        typer.echo(text)


@app.command()
def audit(
    mech: MechOption,
    dataset: DatasetOption = None,
    eps: Optional[float] = typer.Option(None, help="claimed (target) epsilon; the run is calibrated to it"),
    canaries: int = typer.Option(1000, help="number of canaries m, each included with probability 1/2"),
    threat: str = typer.Option("white", help="white (gradient canaries) or black (label-flipped inputs)"),
    train_size: Optional[int] = typer.Option(None, help="train on the first N records only (quicker audits)"),
    model: ModelOption = None,
    delta: DeltaOption = None,
    epochs: EpochsOption = None,
    steps: StepsOption = None,
    batch_size: BatchSizeOption = None,
    physical_batch_size: PhysicalBatchOption = None,
    grad_sample: GradSampleOption = None,
    accountant: AccountantOption = None,
    lr: LrOption = None,
    optimizer: OptimizerOption = None,
    momentum: MomentumOption = None,
    clip: ClipOption = None,
    seed: Optional[int] = typer.Option(None, help="seed of the run and of the canaries (default: 0)"),
    device: DeviceOption = None,
    data_dir: DataDirOption = None,
    out_csv: Optional[str] = typer.Option(None, "--out", help="audit CSV (default: results/audit.csv)"),
    sets: SetOption = [],
    force: ForceOption = False,
    quiet: QuietOption = False,
) -> None:
    """One-run privacy audit (Steinke et al. 2023): an empirical lower bound on eps, at 95% confidence."""
    from dpbench.audit.runner import run_audit
    from dpbench.config import is_private, parse_sets, resolve

    options = _training_options(locals(), out_csv or "results/audit.csv")
    try:
        if eps is None and is_private(mech):
            raise BadInput("missing --eps: give the claimed epsilon (or inf for the non-private control)")
        options["mech_params"] = parse_sets(sets)
        cfg = resolve(options)
        _warn_ignored_eps(cfg.mech, eps)
        row = run_audit(cfg, canaries=canaries, threat=threat, train_size=train_size, show_progress=not quiet)
    except BadInput as exc:
        raise fail(exc)
    _print_verdict(row, cfg.out)


def _print_verdict(row: dict[str, Any], path: str) -> None:
    bound, claimed = row["eps_lower_bound"], row["eps_claimed"]
    out.print(f"[bold]{row['mech']}[/] on {row['dataset']}, {row['threat_model']}-box, m={row['m']}: "
              f"claimed eps {_fmt(claimed)} (delta {row['delta']:g}, {row['accountant']}), "
              f"measured lower bound [bold]{bound:.3f}[/] at {100 * row['confidence']:.0f}% confidence "
              f"({row['correct']}/{row['k']} correct guesses), AUROC {row['auroc']:.3f}, "
              f"TPR@FPR0.01 {row['tpr_at_fpr_0.01']:.3f}, test acc {100 * row['test_acc']:.1f}%, "
              f"{row['wall_s']:.0f} s", highlight=False, soft_wrap=True)
    if row["exceeds_claim"]:
        out.print(f"[bold red]WARNING: the lower bound {bound:.3f} EXCEEDS the claimed eps {_fmt(claimed)}: "
                  "the mechanism or its accountant is not as private as claimed (or this is a 5% false alarm; "
                  "rerun with other seeds)[/]", highlight=False, soft_wrap=True)
    else:
        out.print("[green]consistent with the claim[/] (an audit can only refute a claim, never prove it)",
                  highlight=False)
    out.print(f"row appended to {path}; scores {row['scores_file']}, ROC {row['roc_file']} beside it",
              highlight=False, soft_wrap=True)


def _parameter_count(model: str, meta: dict[str, Any]) -> str:
    """Trainable parameters of ``model`` built for its first dataset's inputs (``*``: MNIST)."""
    from dpbench.data import DATASETS
    from dpbench.models.inputs import model_input_shape
    from dpbench.models import build_model, count_parameters

    dataset = next((d for d in meta.get("datasets", ()) if d in DATASETS), "mnist")
    dmeta = DATASETS.entry(dataset).meta
    # datasets registered without an input_shape are the 28x28 grey-scale image sets
    try:
        shape = model_input_shape(model, tuple(dmeta.get("input_shape", (1, 28, 28))))
        return f"{count_parameters(build_model(model, shape, dmeta.get('num_classes', 10))):,}"
    except Exception:  # a plugin model that cannot be built without its data: show no count
        return "-"


@app.command()
def check(
    mech: str = typer.Argument(..., help="mechanism name (see 'dpbench ls mechanisms'); plugins too"),
    sets: list[str] = typer.Option([], "--set", help="mechanism parameter key=value (repeatable)"),
    grad_sample: str = typer.Option("fast", help="per-sample path the checks train on: fast or reference"),
) -> None:
    """Conformance checks of a mechanism, measured through the real training step on a tiny model.

    One line per property; exit 0 when all hold, 1 naming the first that fails.
    """
    from dpbench.config import check_grad_sample, parse_sets
    from dpbench.conformance import run_checks
    from dpbench.mechanisms import get_mechanism

    try:
        params = parse_sets(sets)
        get_mechanism(mech)(**params)  # unknown names and bad parameters are bad input, not a failed check
        check_grad_sample(grad_sample)
        results = run_checks(mech, params, grad_sample)
    except BadInput as exc:
        raise fail(exc)
    if not get_mechanism(mech).private:
        out.print(f"{mech} is not private: it claims no privacy guarantee, so there is nothing to check")
        return
    for prop in results:
        mark = "[green]PASS[/]" if prop.ok else "[bold red]FAIL[/]"
        out.print(f"{mark} {prop.name}: {prop.detail}", highlight=False, soft_wrap=True)
    failed = [p for p in results if not p.ok]
    if failed:
        out.print(f"[bold red]{mech} fails the conformance check:[/] {failed[0].name} (first of {len(failed)})",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    out.print(f"[green]{mech} passes all {len(results)} conformance checks[/] (per-sample path: {grad_sample})",
              highlight=False)


@app.command("ls")
def list_entries(what: str = typer.Argument("mechanisms", help="mechanisms, datasets or models"),
                 pattern: str = typer.Option("*", help="shell-style filter, e.g. '*cnn*'")) -> None:
    """List registered mechanisms, datasets or models."""
    from dpbench.data import DATASETS
    from dpbench.mechanisms import MECHANISMS
    from dpbench.models import MODELS

    tables = {"mechanisms": MECHANISMS, "datasets": DATASETS, "models": MODELS}
    try:
        if what not in tables:
            from dpbench.registry import did_you_mean

            raise BadInput(f"unknown list {what!r}{did_you_mean(what, list(tables))}; choose mechanisms, datasets or models")
        registry = tables[what]
        t = Table(title=what)
        t.add_column("name", style="bold")
        if what == "mechanisms":
            for col in ("accountant", "parameters", "description"):
                t.add_column(col)
            for name in registry.names(pattern):
                problem = registry.problem(name)
                if problem:  # one broken plugin must not hide the others
                    err.print(f"[yellow]warning:[/] {problem}; skipped", highlight=False, soft_wrap=True)
                    continue
                cls = registry.get(name)
                desc = cls.summary + (f" [yellow]({cls.caveat})[/]" if cls.caveat else "")
                takes = ("" if not cls.private else " (rdp only)" if cls.rdp_only_reason else " (rdp, pld, prv)")
                t.add_row(name, cls.accountant + takes, cls.describe_params() or "-", desc)
        else:
            extra = "train size" if what == "datasets" else "datasets"
            t.add_column(extra)
            if what == "models":
                t.add_column("parameters", justify="right")
            t.add_column("description")
            for name in registry.names(pattern):
                meta = registry.entry(name).meta
                value = meta.get("train_size") if what == "datasets" else ", ".join(meta.get("datasets", ()))
                counts = [_parameter_count(name, meta)] if what == "models" else []
                t.add_row(name, str(value), *counts, meta.get("summary", ""))
    except BadInput as exc:
        raise fail(exc)
    out.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
