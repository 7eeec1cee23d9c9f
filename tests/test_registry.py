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
    from dpbench.recipes import Recipe

    class HalfClip(Mechanism):
        """A third-party mechanism: DP-SGD that clips to half of C (still within the accounted C)."""
        name = "halfclip"
        summary = "test plugin: DP-SGD clipping to C/2"
        param_specs = (Param("factor", float, 0.5, "fraction of C"),)
        recipes = {"synthetic": Recipe("cnn_tanh", 32, 4, 0.123, "sgd", 0.0, 1.0, "the plugin's own recipe")}
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


def test_a_plugin_is_listed_and_its_recipe_reaches_a_sweep_from_the_command_line(tmp_path):
    make_plugin(tmp_path)
    env = {"PYTHONPATH": str(tmp_path), "DPBENCH_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "OMP_WAIT_POLICY": "PASSIVE", "DPBENCH_CACHE": str(tmp_path / "cache")}
    ls = subprocess.run([sys.executable, "-m", "dpbench.cli", "ls", "mechanisms"], capture_output=True,
                        text=True, env=env, cwd=tmp_path)
    assert ls.returncode == 0 and "halfclip" in ls.stdout
    # its recipe reaches every configuration (run and account of an installed plugin: test_example_plugin)
    sweep = subprocess.run([sys.executable, "-m", "dpbench.cli", "sweep", "--mech", "halfclip", "--dataset", "synthetic",
                            "--eps", "8", "--dry-run"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert sweep.returncode == 0 and "--batch-size 32" in sweep.stdout and "--lr 0.123" in sweep.stdout


BROKEN = {
    "dpbench_badimport": "import a_module_that_does_not_exist\n",
    "dpbench_notamech": "def NotAMechanism():\n    return None\n",
    "dpbench_noname": textwrap.dedent('''
        from dpbench.mechanisms.base import Mechanism

        class NoName(Mechanism):
            summary = "forgot its name"
    '''),
}


def make_broken_plugins(root: Path) -> None:
    """One distribution with a good plugin and three broken ones."""
    make_plugin(root)
    for module, text in BROKEN.items():
        (root / f"{module}.py").write_text(text)
    info = root / "dpbench_halfclip-0.1.dist-info"
    (info / "entry_points.txt").write_text(
        "[dpbench.mechanisms]\nhalfclip = dpbench_halfclip:HalfClip\nbadimport = dpbench_badimport:Mech\n"
        "notamech = dpbench_notamech:NotAMechanism\nnoname = dpbench_noname:NoName\n")


def test_broken_plugins_are_one_warning_each_and_the_rest_still_works(tmp_path):
    make_broken_plugins(tmp_path)
    env = {"PYTHONPATH": str(tmp_path), "DPBENCH_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "300",
           "OMP_WAIT_POLICY": "PASSIVE", "DPBENCH_CACHE": str(tmp_path / "cache")}
    ls = subprocess.run([sys.executable, "-m", "dpbench.cli", "ls", "mechanisms"], capture_output=True,
                        text=True, env=env, cwd=tmp_path)
    assert ls.returncode == 0, ls.stderr  # today: a traceback from the import error
    assert "halfclip" in ls.stdout and "dpsgd" in ls.stdout
    warnings = [line for line in ls.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3, ls.stderr
    for name, why in (("badimport", "ModuleNotFoundError"), ("notamech", "not a subclass"),
                      ("noname", "name = 'base'")):
        assert any(f"'{name}'" in w and why in w for w in warnings), (name, warnings)
    run = subprocess.run([sys.executable, "-m", "dpbench.cli", "run", "--mech", "noname", "--dataset", "synthetic",
                          "--eps", "8", "--steps", "1", "--quiet", "--out", "r.csv"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 2 and "noname" in run.stderr and not (tmp_path / "r.csv").exists()


def test_the_registry_checks_the_base_class_and_the_name():
    from dpbench.mechanisms.base import Mechanism
    from dpbench.errors import BrokenPlugin

    reg: Registry = Registry("mechanism", base=Mechanism)

    class Good(Mechanism):
        name = "good"

    class Unnamed(Mechanism):
        pass

    reg.register("good")(Good)
    reg.register("unnamed")(Unnamed)
    reg.register("function")(lambda: None)
    assert reg.get("good") is Good and reg.problem("good") is None
    with pytest.raises(BrokenPlugin, match="must set name = 'unnamed'"):
        reg.get("unnamed")
    assert "not a subclass" in reg.problem("function")
