"""Cost of privacy per mechanism: samples/s and peak memory as a ratio to non-private training.

Every mechanism trains the same model on the same data for the same number of steps in this one
process, so the ratios are comparable even on a busy machine (the other processes' load is printed).

    python benchmarks/bench_overhead.py [--dataset mnist] [--steps 60] [--mech dpsgd,dpis]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dpbench.config import resolve  # noqa: E402
from dpbench.data import load_dataset  # noqa: E402
from dpbench.engine import train  # noqa: E402
from dpbench.environment import LoadMeter  # noqa: E402
from dpbench.mechanisms import MECHANISMS, get_mechanism  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--mech", default=",".join(MECHANISMS.names()))
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    data = load_dataset(args.dataset, args.data_dir)
    names = ["nonprivate"] + [m for m in args.mech.split(",") if m != "nonprivate"]
    rows = []
    for name in names:
        cfg = resolve({"mech": name, "dataset": args.dataset, "eps": 3.0, "steps": args.steps})
        cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
        mech = get_mechanism(name)()
        mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
        meter = LoadMeter()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = train(cfg, mech, data, 1.0 if mech.private else 0.0, args.steps, torch.device("cpu"),
                    show_progress=False)
        rows.append((name, out.samples_seen / out.train_wall_s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0,
                     meter.other_load()))
    base = rows[0][1]
    t = Table(title=f"{args.dataset}: {args.steps} steps, {torch.get_num_threads()} threads")
    for col in ("mechanism", "samples/s", "time ratio vs non-private", "peak RSS growth (MB)", "other load (cores)"):
        t.add_column(col)
    for name, sps, rss, load in rows:
        t.add_row(name, f"{sps:.0f}", f"{base / sps:.2f}x", f"{rss / 1024:.0f}", f"{load:.2f}" if load is not None else "-")
    Console().print(t)


if __name__ == "__main__":
    main()
