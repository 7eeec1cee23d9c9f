"""The engine's cost table: ``bench_overhead.py`` for every (dataset, model) of the speed targets, in one file.

Each configuration runs in its own process (``bench_overhead.py --json``); the rows are written as
JSON and as a markdown table with the machine's other load, the thread count and the exact commands.

    python benchmarks/perf_table.py --out results/perf/cpu [--grad-sample fast] [--device cpu] [--only cnn_tanh]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dpbench.config import GRAD_SAMPLE_PATHS  # noqa: E402
from dpbench.environment import environment  # noqa: E402

ALL_MECHS = "dpsgd,dpis,modelmix,auto_s,psac,psasc,rs,ged"
#: (dataset, model, mechanisms, target time/sample of dpsgd vs non-private) of the speed targets.
CONFIGS = [
    ("mnist", "cnn_tanh", ALL_MECHS, 1.3),
    ("imdb", "embbag", "dpsgd", 2.0),
    ("mnist", "scatter_linear", "dpsgd", 2.0),
    ("fmnist", "scatter_linear", "dpsgd", 2.0),
    ("cifar10", "scatter_linear", "dpsgd", 2.0),
    ("cifar10", "cnn_tanh_cifar", "dpsgd", 1.8),
    ("cifar10", "resnet20_gn", "dpsgd", 1.8),
    ("imdb", "bilstm", "dpsgd", 3.0),
]
#: Other mechanisms against dpsgd on the same model.
MECH_TARGETS = {"dpis": 2.0, "ged": 3.0}
OTHER_MECH_TARGET = 1.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grad-sample", default="fast", choices=GRAD_SAMPLE_PATHS)
    ap.add_argument("--only", default=None, help="comma-separated models to run (default: all)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    bench = Path(__file__).with_name("bench_overhead.py")
    rows, commands, t0 = [], [], time.time()
    for dataset, model, mechs, _ in CONFIGS:
        if only and model not in only:
            continue
        cmd = [sys.executable, str(bench), "--dataset", dataset, "--model", model, "--mech", mechs, "--steps",
               str(args.steps), "--device", args.device, "--grad-sample", args.grad_sample, "--json"]
        shown = " ".join(["python", "benchmarks/bench_overhead.py", *cmd[2:]])
        print(f"{time.strftime('%H:%M:%S')} {shown}", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"failed: {shown}")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
        commands.append(shown)
        write(Path(args.out), rows, commands, t0)  # after each configuration: a killed table keeps its rows
    print(Path(args.out).with_suffix(".md").read_text())


def write(out: Path, rows: list[dict], commands: list[str], t0: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": os.environ.get("OMP_NUM_THREADS"),
            "git_commit": environment()["git_commit"], "minutes": round((time.time() - t0) / 60, 1), "commands": commands}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta))


def markdown(rows: list[dict], meta: dict) -> str:
    dpsgd = {(r["dataset"], r["model"]): r["ratio_vs_nonprivate"] for r in rows if r["mech"] == "dpsgd"}
    targets = {(d, m): t for d, m, _, t in CONFIGS}
    lines = [f"Machine: {meta['machine']}; OMP_NUM_THREADS={meta['threads']}; commit {meta.get('git_commit')}; "
             f"{meta['minutes']} min. Other load: "
             "the other processes' average CPU use (cores) while the configuration's times were measured.", "",
             "Time per sample is per record trained on (B a step); drawn/B: the records the sampler drew per "
             "record trained on (DPIS's candidates; empty in tables measured before it was reported).", "",
             "| dataset | model | mechanism | per-sample path | B | drawn/B | samples/s | time/sample vs non-private | "
             "vs dpsgd | target | peak extra memory (MB) | vs non-private | other load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["dataset"], r["model"])
        if r["mech"] == "nonprivate":
            vs, target = "", ""
        elif r["mech"] == "dpsgd":
            vs, target = "1.00x", f"<= {targets.get(key, float('nan'))}x non-private"
        else:
            vs = f"{r['ratio_vs_nonprivate'] / dpsgd[key]:.2f}x" if key in dpsgd else ""
            target = f"<= {MECH_TARGETS.get(r['mech'], OTHER_MECH_TARGET)}x dpsgd"
        lines.append(f"| {r['dataset']} | {r['model']} | {r['mech']} | {r.get('grad_sample') or '-'} | "
                     f"{r['batch_size']} | {r.get('drawn_per_batch', '')} | {r['samples_per_s']:.0f} | "
                     f"{r['ratio_vs_nonprivate']:.2f}x | {vs} | "
                     f"{target} | {r['peak_mem_mb']:.0f} | {r['peak_mem_ratio']:.2f}x | {r.get('other_load', '')} |")
    lines += ["", "Commands:", "", *[f"    {c}" for c in meta["commands"]], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
