"""Wall time of one sweep with the local backend and with ``--backend ray`` on this machine.

    python benchmarks/bench_ray.py --out results/perf/ray [--eps 1,2,4,8 --epochs 5 --jobs 2]

Runs the same grid (DP-SGD, MNIST, ScatterNet + linear, one seed per eps) twice, each into a fresh CSV:
``dpbench sweep --jobs J`` (J local processes) and ``dpbench sweep --backend ray --cpus-per-run 1`` (a
local Ray instance with J CPUs). Writes ``<out>.md`` with the commands, the wall times, their ratio, and
the test accuracies of both (the same configurations, so the same numbers up to floating point).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def sweep(folder: Path, args: argparse.Namespace, extra: list[str]) -> tuple[list[str], float, pd.DataFrame]:
    shutil.rmtree(folder, ignore_errors=True)
    cmd = ["dpbench", "sweep", "--mech", "dpsgd", "--dataset", args.dataset, "--model", args.model, "--eps", args.eps,
           "--seeds", "0", "--epochs", str(args.epochs), "--jobs", str(args.jobs), "--out", str(folder / "runs.csv"),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpbench.cli", *cmd[1:]], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cmd, time.perf_counter() - t0, pd.read_csv(folder / "runs.csv")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/perf/ray")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--model", default="scatter_linear")
    p.add_argument("--eps", default="1,2,4,8")
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    work = Path(args.out + "-runs")
    local_cmd, local_s, local = sweep(work / "local", args, [])
    ray_cmd, ray_s, remote = sweep(work / "ray", args, ["--backend", "ray", "--cpus-per-run", "1"])
    acc = pd.DataFrame({"eps": local.sort_values("eps_target")["eps_target"].to_numpy(),
                        "local test_acc": local.sort_values("eps_target")["test_acc"].to_numpy(),
                        "ray test_acc": remote.sort_values("eps_target")["test_acc"].to_numpy(),
                        "local run wall_s": local.sort_values("eps_target")["wall_s"].to_numpy(),
                        "ray run wall_s": remote.sort_values("eps_target")["wall_s"].to_numpy()})
    lines = [f"# Sweep wall time: local backend against Ray ({os.cpu_count()} CPUs, {args.jobs} runs at once)", "",
             f"- local: `{' '.join(local_cmd)}`: **{local_s:.1f} s**",
             f"- ray: `{' '.join(ray_cmd)}`: **{ray_s:.1f} s** (a local Ray instance started and stopped by the "
             f"sweep)", f"- ray / local: **{ray_s / local_s:.2f}**", "",
             "Per configuration (wall_s is the training time inside the run):", "",
             "| " + " | ".join(acc.columns) + " |", "|" + "---|" * len(acc.columns),
             *("| " + " | ".join(f"{v:g}" if c == "eps" else f"{v:.4f}" if "acc" in c else f"{v:.1f}"
                                 for c, v in row.items()) + " |" for _, row in acc.iterrows()), "",
             f"Written by `python benchmarks/bench_ray.py --out {args.out} --dataset {args.dataset} --model "
             f"{args.model} --eps {args.eps} --epochs {args.epochs:g} --jobs {args.jobs}`."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
