"""Cost of privacy per mechanism: time per sample and peak memory as ratios to non-private training.

Every mechanism trains the same model on the same data in this one process, interleaved round by
round with the non-private control, so the ratios are comparable even on a busy machine (the other
processes' load is reported). Warm-up steps are excluded: a step's time runs from one step's start to
the next (timestamps from the mechanism's ``begin_step``), counted only after ``--warmup`` steps.
Time per sample is per record trained on: every step counts its logical batch B (the expected batch of
Poisson sampling), not the records its sampler drew. DPIS draws about B/r_hat candidates a step and computes
each one's gradient norm, so per drawn record it looks up to 1/r_hat times cheaper than it is per step;
``drawn/B`` reports that ratio.
Peak memory is measured apart, one fresh process per mechanism (an allocator that has served earlier runs
hides their growth): the largest resident set during training (sampled every 2 ms) above the one before;
on a GPU, the peak of torch's allocated device memory above the one before.

    python benchmarks/bench_overhead.py [--dataset mnist] [--model M] [--mech dpsgd,dpis] [--steps 20] [--json]
                                        [--grad-sample fast|reference] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dpbench.config import GRAD_SAMPLE_PATHS, resolve  # noqa: E402
from dpbench.data import load_dataset  # noqa: E402
from dpbench.engine import train  # noqa: E402
from dpbench.environment import LoadMeter  # noqa: E402
from dpbench.mechanisms import MECHANISMS, get_mechanism  # noqa: E402
from dpbench.models.inputs import prepare_for_model  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakRss:
    """The largest resident set during a ``with`` block, above the one at its start (bytes)."""

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def measure(cfg, data, device: torch.device, warmup: int, steps: int) -> tuple[float, int, int, int]:  # noqa: ANN001
    """(seconds, records trained on, records drawn, peak extra bytes) of ``steps`` steps after ``warmup``.

    One run of the real loop. Records trained on: ``steps`` logical batches of ``cfg.batch_size``.
    """
    mech = get_mechanism(cfg.mech)(**cfg.mech_params)
    mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
    starts: list[float] = []
    sizes: list[int] = []
    begin_step, make_sampler = mech.begin_step, mech.make_sampler

    def timed_begin_step(ctx, step):  # noqa: ANN001
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        starts.append(time.perf_counter())
        begin_step(ctx, step)

    def counted_sampler(*args):  # noqa: ANN002
        for batch in make_sampler(*args):
            sizes.append(len(batch))
            yield batch

    mech.begin_step, mech.make_sampler = timed_begin_step, counted_sampler
    total = warmup + steps + 1  # one more step: its start ends the last measured one
    if device.type == "cuda":  # device memory: the peak allocated by torch above what was allocated before
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with PeakRss() as memory:
        train(cfg, mech, data, 1.0 if mech.private else 0.0, total, device, show_progress=False)
    extra = memory.extra if device.type != "cuda" else torch.cuda.max_memory_allocated(device) - before
    return (starts[warmup + steps] - starts[warmup], steps * cfg.batch_size, sum(sizes[warmup:warmup + steps]),
            extra)


def memory_of(name: str, args: argparse.Namespace) -> int:
    """Peak extra resident bytes of one mechanism's training, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--dataset", args.dataset, "--mech", name, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device, "--memory-of", name,
           "--grad-sample", args.grad_sample]
    for flag, value in (("--model", args.model), ("--data-dir", args.data_dir)):
        if value:
            cmd += [flag, value]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default=None, help="model (default: the dataset's recipe)")
    ap.add_argument("--mech", default=",".join(m for m in MECHANISMS.names(plugins=False) if m != "nonprivate"))
    ap.add_argument("--steps", type=int, default=20, help="measured steps per round")
    ap.add_argument("--warmup", type=int, default=3, help="steps per round not measured")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all mechanisms")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grad-sample", default="fast", choices=GRAD_SAMPLE_PATHS,
                    help="per-sample path of the private mechanisms")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", action="store_true", help="print only a JSON list of results")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the child of memory_of()
    args = ap.parse_args()
    device = torch.device(args.device)
    names = ["nonprivate"] + [m for m in args.mech.split(",") if m and m != "nonprivate"]
    configs = {}
    for name in names:
        options = {"mech": name, "dataset": args.dataset, "eps": 3.0, "steps": args.steps, "device": args.device}
        if args.model:
            options["model"] = args.model
        configs[name] = dataclasses.replace(resolve(options), data_dir=args.data_dir, grad_sample=args.grad_sample)
    # the same model and batch size for every mechanism: the non-private control's recipe
    model, batch_size = configs["nonprivate"].model, configs["nonprivate"].batch_size
    data = prepare_for_model(load_dataset(args.dataset, args.data_dir), model, device)
    if args.memory_of:
        cfg = dataclasses.replace(configs[args.memory_of], model=model, batch_size=batch_size)
        print(measure(cfg, data, device, args.warmup, args.steps)[3])
        return
    seconds = {n: 0.0 for n in names}
    samples = {n: 0 for n in names}
    drawn = {n: 0 for n in names}
    peak = {n: 0 for n in names}
    meter = LoadMeter()
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # alternate the order, so drift cancels
            cfg = dataclasses.replace(configs[name], model=model, batch_size=batch_size, seed=r)
            s, n, d, _ = measure(cfg, data, device, args.warmup, args.steps)
            seconds[name] += s
            samples[name] += n
            drawn[name] += d
    load = meter.other_load()  # before the memory runs: they are our own child processes
    for name in names:
        peak[name] = memory_of(name, args)
    base_time = seconds["nonprivate"] / samples["nonprivate"]
    rows = [{"dataset": args.dataset, "model": model, "mech": n, "batch_size": batch_size,
             "samples_per_s": round(samples[n] / seconds[n], 1),
             "ratio_vs_nonprivate": round(seconds[n] / samples[n] / base_time, 3),
             "drawn_per_batch": round(drawn[n] / samples[n], 3),
             "peak_mem_mb": round(peak[n] / 2**20, 1),
             "peak_mem_ratio": round(peak[n] / max(peak["nonprivate"], 1), 3),
             "steps": args.steps * args.rounds, "threads": torch.get_num_threads(), "device": args.device,
             "grad_sample": args.grad_sample if n != "nonprivate" else None,
             "other_load": None if load is None else round(load, 2)}
            for n in names]
    if args.json:
        json.dump(rows, sys.stdout)
        sys.stdout.write("\n")
        return
    t = Table(title=f"{args.dataset}/{model}: {args.rounds} x {args.steps} measured steps, {torch.get_num_threads()} "
                    f"threads, other load {load:.2f} cores" if load is not None else f"{args.dataset}/{model}")
    for col in ("mechanism", "B", "drawn/B", "samples/s", "time/sample vs non-private", "peak extra memory (MB)",
                "vs non-private"):
        t.add_column(col)
    for row in rows:
        t.add_row(row["mech"], str(row["batch_size"]), f"{row['drawn_per_batch']:.2f}", f"{row['samples_per_s']:.0f}",
                  f"{row['ratio_vs_nonprivate']:.2f}x", f"{row['peak_mem_mb']:.0f}", f"{row['peak_mem_ratio']:.2f}x")
    Console().print(t)


if __name__ == "__main__":
    main()
