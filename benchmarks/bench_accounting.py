"""What calibration costs by each accountant, and the noise each one needs, on the built-in recipes.

For every (mechanism, dataset, model) below and every target eps, the noise multiplier is calibrated
by RDP, PLD and PRV (where they apply), timed in this process, and the eps of the calibrated noise is
read back by the same accountant. Rows go to ``<out>.json`` and ``<out>.md`` after each configuration.

    python benchmarks/bench_accounting.py --out results/perf/accounting [--eps 0.1,1,3,8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dpbench.environment import environment  # noqa: E402
from dpbench.pipeline import plan_accounting  # noqa: E402
from dpbench.privacy import ACCOUNTANTS, account, calibrate, pld  # noqa: E402
from dpbench.privacy import dpis as dpis_privacy  # noqa: E402

#: (mechanism, dataset, model): the recipes of the benchmark's dataset/model pairs.
CONFIGS = [("dpsgd", "mnist", "cnn_tanh"), ("dpsgd", "fmnist", "cnn_tanh"), ("dpsgd", "cifar10", "scatter_linear"),
           ("dpsgd", "imdb", "embbag"), ("dpis", "mnist", "cnn_tanh"), ("modelmix", "mnist", "cnn_tanh")]


def clear_caches() -> None:
    """Every calibration starts cold, as in a fresh ``dpbench run`` process."""
    pld._pld_eps.cache_clear()
    dpis_privacy._sgm_step.cache_clear()
    dpis_privacy.auto_sigma_k.cache_clear()


def measure(mech: str, dataset: str, model: str, eps: float) -> list[dict]:
    plan = plan_accounting(mech, params={}, dataset=dataset, model=model, sigma=1.0)  # the recipe's B, T and C
    mechanism, q, steps = plan.mech, plan.q, plan.steps
    rows = []
    for accountant in ACCOUNTANTS:
        if accountant != "rdp" and mechanism.rdp_only_reason is not None:
            continue
        clear_caches()
        started = time.perf_counter()
        noise = calibrate(mechanism, eps, q, steps, 1e-5, accountant)
        seconds = time.perf_counter() - started
        spent = account(mechanism, noise, q, steps, 1e-5, accountant, with_others=False).eps
        rows.append({"mech": mech, "dataset": dataset, "model": model, "batch_size": plan.batch_size,
                     "steps": steps, "q": q, "eps_target": eps, "accountant": accountant,
                     "noise_multiplier": noise, "eps_spent": spent, "calibration_s": round(seconds, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], command: str, env: dict) -> str:
    lines = ["# Calibration by accountant: noise needed and time taken", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; dpbench {env['git_commit'][:12]}, "
             f"opacus {env['opacus_version']}. delta = 1e-5; T and q from each recipe. Calibration time is "
             "one process's wall time for the bisection (PLD at discretisation 1e-4, PRV at 1 % of eps).", "",
             "| mech | dataset/model | B | T | eps | accountant | sigma | sigma / sigma_RDP | eps spent | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rdp = {(r["mech"], r["dataset"], r["eps_target"]): r["noise_multiplier"] for r in rows if r["accountant"] == "rdp"}
    for r in rows:
        ratio = r["noise_multiplier"] / rdp[(r["mech"], r["dataset"], r["eps_target"])]
        lines.append(f"| {r['mech']} | {r['dataset']}/{r['model']} | {r['batch_size']} | {r['steps']} | "
                     f"{r['eps_target']:g} | {r['accountant']} | {r['noise_multiplier']:.4f} | {ratio:.3f} | "
                     f"{r['eps_spent']:.4f} | {r['calibration_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path without suffix; .json and .md are written")
    parser.add_argument("--eps", default="0.1,1,3,8", help="comma-separated targets")
    args = parser.parse_args()
    targets = [float(e) for e in args.eps.split(",")]
    env = environment()
    command = " ".join(["python", "benchmarks/bench_accounting.py", *sys.argv[1:]])
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for mech, dataset, model in CONFIGS:
        for eps in targets:
            rows += measure(mech, dataset, model, eps)
        out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(markdown(rows, command, env))


if __name__ == "__main__":
    main()
