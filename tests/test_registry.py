"""The generic registry: decorators, lazy entries, patterns, did-you-mean, entry-point plugins."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpbench.errors import UnknownName
from dpbench.registry import Registry


def test_decorator_lookup_and_pattern():
    reg: Registry = Registry("model")

    @reg.register("cnn_small", datasets=("mnist",))
    def cnn_small():
        return "cnn"

    @reg.register()
    def resnet_gn():
        return "resnet"

    assert reg.get("cnn_small")() == "cnn"
    assert reg.entry("cnn_small").meta == {"datasets": ("mnist",)}
    assert reg.names() == ["cnn_small", "resnet_gn"]
    assert reg.names("*cnn*") == ["cnn_small"]
    assert "resnet_gn" in reg and "vgg" not in reg


def test_unknown_name_suggests_close_match():
    reg: Registry = Registry("mechanism")
    reg.register("dpsgd")(object)
    with pytest.raises(UnknownName, match=r"did you mean 'dpsgd'\?"):
        reg.get("dpsdg")
    with pytest.raises(UnknownName) as info:
        reg.get("zzz")
    assert "did you mean" not in str(info.value) and "known: dpsgd" in str(info.value)


def test_lazy_entry_is_imported_on_first_use():
    reg: Registry = Registry("thing")
    reg.register_lazy("join", "os.path:join")
    assert isinstance(reg.entry("join").target, str)
    import os.path

    assert reg.get("join") is os.path.join


def test_double_registration_is_an_error():
    reg: Registry = Registry("thing")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(float)


PLUGIN = textwrap.dedent('''
    from dpbench.mechanisms.base import Mechanism, Param

    class HalfClip(Mechanism):
        """A third-party mechanism: DP-SGD that clips to half of C (still within the accounted C)."""
        name = "halfclip"
        summary = "test plugin: DP-SGD clipping to C/2"
        param_specs = (Param("factor", float, 0.5, "fraction of C"),)
''')


def make_plugin(root: Path) -> None:
    """A minimal installed distribution: a module plus dist-info with an entry point."""
    (root / "dpbench_halfclip.py").write_text(PLUGIN)
    info = root / "dpbench_halfclip-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dpbench-halfclip\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dpbench.mechanisms]\nhalfclip = dpbench_halfclip:HalfClip\n")


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    make_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("mechanism", entry_point_group="dpbench.mechanisms")
    assert "halfclip" in reg.names()
    cls = reg.get("halfclip")
    assert cls.name == "halfclip" and cls().params == {"factor": 0.5}


def test_plugin_runs_end_to_end_from_the_command_line(tmp_path):
    make_plugin(tmp_path)
    env = {"PYTHONPATH": str(tmp_path), "DPBENCH_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "OMP_WAIT_POLICY": "PASSIVE", "DPBENCH_CACHE": str(tmp_path / "cache")}
    ls = subprocess.run([sys.executable, "-m", "dpbench.cli", "ls", "mechanisms"], capture_output=True,
                        text=True, env=env, cwd=tmp_path)
    assert ls.returncode == 0 and "halfclip" in ls.stdout
    run = subprocess.run([sys.executable, "-m", "dpbench.cli", "run", "--mech", "halfclip", "--dataset",
                          "synthetic", "--eps", "8", "--steps", "3", "--quiet", "--out", "r.csv"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "halfclip" in (tmp_path / "r.csv").read_text()
