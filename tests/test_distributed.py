"""The Ray backend: same rows as the local backend, one writer, and every configuration exactly once when a
node dies mid-task or the driver is killed. Loopback only (a local instance, and a two-node
``ray.cluster_utils.Cluster`` on this machine)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from dpbench.errors import BadInput
from dpbench.sweep import SweepSpec, expand, finished_keys, run_sweep

ray = pytest.importorskip("ray")

#: Columns that differ between two runs of one configuration whatever the backend.
TIMING = ["run_id", "started_at", "finished_at", "wall_s", "samples_per_s", "peak_mem_mb", "other_load"]


def grid(eps: list[float], steps: int, mechs: tuple[str, ...] = ("dpsgd",)) -> list:
    return expand(SweepSpec(grid={"mech": list(mechs), "dataset": ["synthetic"], "eps": eps, "seed": [0]},
                            fixed={"steps": steps}))


def rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"config_hash": str})


def exactly_once(path: Path, configs: list) -> None:
    df = rows(path)
    assert len(df) == len(configs), df[["mech", "eps_target", "seed"]]
    assert df.groupby(["config_hash", "seed"]).size().max() == 1
    assert sorted(zip(df["mech"], df["eps_target"])) == sorted((c.mech, c.eps) for c in configs)


def test_ray_sweep_on_a_local_instance_writes_the_local_backends_rows(tmp_path, monkeypatch):
    from dpbench.distributed import run_sweep_ray

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads on both sides, so the same floats
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # a stale address (nothing answers) must not be joined
    configs = grid([2.0], 6, ("dpsgd", "nonprivate"))
    local, remote = tmp_path / "local" / "runs.csv", tmp_path / "ray" / "runs.csv"
    assert all(o.ok for o in run_sweep(configs, str(local), jobs=1))
    assert not ray.is_initialized()
    outcomes = run_sweep_ray(configs, str(remote), cpus_per_run=1)
    assert [o.ok for o in outcomes] == [True, True]
    assert not ray.is_initialized()  # the instance it started is stopped
    exactly_once(remote, configs)
    a, b = (rows(p).drop(columns=TIMING).sort_values("mech").reset_index(drop=True) for p in (local, remote))
    pd.testing.assert_frame_equal(a, b)
    # the driver wrote one record per row; no checkpoint is left; a re-run trains nothing
    records = sorted(p.stem for p in (remote.parent / "runs").glob("*.json"))
    assert records == sorted(rows(remote)["run_id"])
    assert not list((remote.parent / "checkpoints").glob("*.pt"))
    assert run_sweep_ray(configs, str(remote)) == []


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPUs (the driver's) and one worker node with one CPU: every task runs on a worker."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


#: How long a test waits for a Ray task to start or end before it fails: generous, since it only matters on
#: failure, and a loaded machine starts Ray workers slowly (a first run took 81 s with four processes on 2 cores).
WAIT_S = 300


def connect(cluster) -> None:  # noqa: ANN001
    """This process as the driver on ``cluster``, its tasks reading the test's cache offline."""
    ray.init(address=cluster.address, runtime_env={"env_vars": {"DPBENCH_CACHE": os.environ["DPBENCH_CACHE"],
                                                                "DPBENCH_OFFLINE": "1"}})


@pytest.fixture
def connected(cluster):
    """This process connected to ``cluster``, and disconnected afterwards even when the test fails midway (a
    driver thread left connected would answer the next test's calls)."""
    connect(cluster)
    yield cluster
    if ray.is_initialized():
        ray.shutdown()


def test_a_node_removed_mid_task_still_gives_every_configuration_exactly_once(connected, tmp_path, monkeypatch):
    from dpbench.distributed import run_sweep_ray

    cluster = connected
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    configs = grid([1.0, 2.0, 4.0], 150)
    out = tmp_path / "runs.csv"
    outcomes: list = []
    driver = threading.Thread(target=lambda: outcomes.extend(
        run_sweep_ray(configs, str(out), checkpoint_every_s=0.0)), daemon=True)
    driver.start()
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + WAIT_S
    # wait for a run that has a checkpoint and no row: it is training on the only worker node
    in_flight = None
    while time.time() < deadline and in_flight is None:
        done = {h for h, _ in finished_keys(out)}
        in_flight = next((p.name.split("-")[0] for p in checkpoints.glob("*.pt") if p.name.split("-")[0] not in done),
                         None)
        time.sleep(0.1)
    assert in_flight is not None, "no run started"
    doomed = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
    cluster.remove_node(doomed, allow_graceful=False)
    cluster.add_node(num_cpus=1)  # where the retried task and the rest run
    driver.join(timeout=WAIT_S)
    assert not driver.is_alive()
    assert [o.ok for o in outcomes] == [True] * 3, [o.detail for o in outcomes]
    exactly_once(out, configs)
    assert not out.with_suffix(".failures.log").exists()
    import json

    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    retried = [r for r in records if r["row"]["config_hash"] == in_flight]
    assert len(retried) == 1 and retried[0]["ray_node"] != doomed.node_id  # finished on the node added after
    assert retried[0]["resumed_from_step"] > 0  # from the checkpoint its first attempt left


def test_a_killed_driver_restarts_and_finishes_without_duplicates(cluster, tmp_path):
    out = tmp_path / "runs.csv"
    cmd = [sys.executable, "-m", "dpbench.cli", "sweep", "--mech", "dpsgd", "--dataset", "synthetic",
           "--eps", "1,2,3", "--seeds", "0", "--epochs", "16", "--out", str(out),
           "--backend", "ray", "--address", cluster.address]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + WAIT_S
    while time.time() < deadline and len(finished_keys(out)) < 1:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # one row written, other tasks queued or in flight
    proc.wait()
    assert 1 <= len(finished_keys(out)) < 3
    resumed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already in" in resumed.stderr and "node " in resumed.stderr
    exactly_once(out, expand(SweepSpec(grid={"mech": ["dpsgd"], "dataset": ["synthetic"], "eps": [1, 2, 3],
                                             "seed": [0]}, fixed={"epochs": 16})))


@pytest.mark.slow  # about 35 s idle: two tunes of 5 trials
def test_tune_on_ray_one_trial_at_a_time_gives_the_local_tunes_trials(cluster, tmp_path):
    import optuna

    from dpbench.tuning.runner import TuneRequest, tune
    from dpbench.tuning.space import SharedSpace

    def request(folder: str, backend: str) -> TuneRequest:
        return TuneRequest(mechs=("dpsgd",), dataset="synthetic", model="linear", eps=4.0, trials=5,
                           study=f"{folder}/s.db", out=f"{folder}/r.toml", backend=backend,
                           shared=SharedSpace(batch_sizes=(32, 64), epochs=(1.0, 2.0)))

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task trains: the same reductions, so the same floats
    try:
        local = tune(request("local", "local"))
    finally:
        torch.set_num_threads(threads)
    connect(cluster)  # after the local tune: the fixture would connect before it
    try:
        remote = tune(request("ray", "ray"))
    finally:
        ray.shutdown()

    def trials(folder: str) -> list[tuple]:
        study = optuna.load_study(study_name="dpsgd", storage=f"sqlite:///{Path(folder, 's.db').resolve()}")
        return [(t.number, t.state, t.params, t.value, t.intermediate_values) for t in study.trials]

    assert trials("ray") == trials("local")  # same sampler draws, values, reports and pruning decisions
    assert any(t[1] == optuna.trial.TrialState.COMPLETE for t in trials("ray"))
    assert remote[0].val_acc == local[0].val_acc and remote[0].lr == local[0].lr
    a, b = (rows(Path(f, "s.trials.csv")).drop(columns=TIMING) for f in ("local", "ray"))
    pd.testing.assert_frame_equal(a, b)  # the driver wrote the trials' rows


def test_a_ray_tasks_progress_lines_name_the_studys_trial_not_its_stand_in(tmp_path, capsys):
    from dpbench.tuning.distributed import trial_in_task
    from dpbench.tuning.runner import TuneRequest, trial_config
    from dpbench.tuning.space import SharedSpace

    req = TuneRequest(mechs=("dpsgd",), dataset="synthetic", model="linear", eps=4.0, trials=5,
                      study=str(tmp_path / "s.db"), out=str(tmp_path / "r.toml"),
                      shared=SharedSpace(batch_sizes=(32,), epochs=(2.0,)))
    cfg = trial_config(req, "dpsgd", {"lr": 0.1, "batch_size": 32, "epochs": 2.0, "momentum": 0.0,
                                      "optimizer": "sgd", "clip": 1.0}, {})
    import torch

    threads = torch.get_num_threads()
    try:  # the task body, in this process (its stand-in trial is number 0); it sets the thread count
        outcome = trial_in_task(cfg, [], 1, 7)
    finally:
        torch.set_num_threads(threads)
    assert outcome["state"] == "complete"
    err = capsys.readouterr().err
    assert len(re.findall(r"^dpsgd: trial 7 at step \d+ of \d+, validation accuracy", err, re.M)) == 3
    assert "trial 0" not in err


def test_backend_options_are_checked_before_anything_runs(tmp_path):
    from dpbench.distributed import check_backend

    with pytest.raises(BadInput, match="--backend 'slurm'"):
        check_backend("slurm", None, 1, 0)
    with pytest.raises(BadInput, match="--address 1.2.3.4:6379: only with --backend ray"):
        check_backend("local", "1.2.3.4:6379", 1, 0)
    with pytest.raises(BadInput, match="--cpus-per-run 0"):
        check_backend("ray", None, 0, 0)
    with pytest.raises(BadInput, match="--gpus-per-run -1"):
        check_backend("ray", None, 1, -1)
    from typer.testing import CliRunner

    from dpbench.cli import app

    res = CliRunner().invoke(app, ["sweep", "--mech", "dpsgd", "--dataset", "synthetic", "--out", str(tmp_path / "x.csv"),
                                   "--backend", "ray", "--devices", "cuda:0,cuda:1"])
    assert res.exit_code == 2 and "--gpus-per-run" in res.output
    from dpbench.distributed import run_sweep_ray, sole_writer

    out = tmp_path / "r.csv"
    with sole_writer(str(out)), pytest.raises(BadInput, match="another sweep driver is writing it"):
        run_sweep_ray(grid([2.0], 2), str(out))  # refused before Ray starts
    assert not out.exists()
    with pytest.raises(BadInput, match="--address 127.0.0.1:9: no Ray cluster answers there"):
        run_sweep_ray(grid([2.0], 2), str(out), address="127.0.0.1:9")  # refused at once, not after minutes
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_address_other_than_the_connected_clusters_is_refused(connected, tmp_path):
    import socket

    from dpbench.distributed import check_same_cluster, run_sweep_ray

    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()  # reachable, so the refusal below is about the connection, not the address
    port = other.getsockname()[1]
    out = tmp_path / "r.csv"
    try:
        with pytest.raises(BadInput, match=f"--address 127.0.0.1:{port}: this process is already connected"):
            run_sweep_ray(grid([2.0], 2), str(out), address=f"127.0.0.1:{port}")
    finally:
        other.close()
    assert not out.exists() and ray.is_initialized()  # nothing ran; the connection is the caller's to close
    own_port = connected.address.rpartition(":")[2]
    check_same_cluster(f"localhost:{own_port}", connected.address)  # the same port: the same cluster
    check_same_cluster(None, connected.address)


def test_missing_ray_is_an_exit_2_that_says_how_to_install_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dpbench.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray looks like to import
    res = CliRunner().invoke(app, ["sweep", "--mech", "dpsgd", "--dataset", "synthetic", "--out",
                                   str(tmp_path / "r.csv"), "--backend", "ray"])
    assert res.exit_code == 2
    assert "pip install 'dpbench[ray]'" in " ".join(res.output.split())
    assert not (tmp_path / "r.csv").exists()
