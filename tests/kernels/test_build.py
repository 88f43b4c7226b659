"""The fused CPU kernel's build (lem/kernels/cpu.py load): announced, keyed by content, its failure
logged and pointed at the user's call, and buildable ahead of time."""
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import lem
from lem import kernels
from lem.kernels import cpu


@pytest.fixture
def fresh_cpu(tmp_path, monkeypatch):
    """cpu.load() as in a new process, building into tmp_path/build."""
    monkeypatch.setattr(cpu, "BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(kernels, "_broken", {})
    return tmp_path


def test_a_failed_build_is_announced_logged_and_warned_at_the_callers_line(fresh_cpu, monkeypatch, capsys):
    broken = fresh_cpu / "lem_cpu.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu, "SOURCE", broken)
    layer = lem.LEM(2, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        layer(torch.randn(5, 3, 2))  # the user's call
    (warning,) = [w for w in caught if "'cpp' is unavailable" in str(w.message)]
    assert (Path(warning.filename).resolve(), warning.lineno) == (Path(__file__).resolve(), line)
    log = fresh_cpu / "build" / "build.log"
    assert f"the compiler's full output is in {log}" in str(warning.message)
    assert "this is not C++" in log.read_text() and "error" in log.read_text()
    err = capsys.readouterr().err
    assert f"lem: building the fused CPU kernel, once, about 1-2 min, in {fresh_cpu / 'build'}" in err
    assert "lem: the build of the fused CPU kernel failed after" in err


def test_a_build_says_when_it_ends_and_how_long_it_took(fresh_cpu, monkeypatch, capsys):
    built = types.SimpleNamespace(__file__=str(fresh_cpu / "build" / "lem_cpu_x.so"))
    monkeypatch.setattr(cpu, "_cpp_extension", lambda: types.SimpleNamespace(load=lambda **kwargs: built))
    assert cpu.load() is built
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("lem: building the fused CPU kernel, once")
    assert err[1].startswith("lem: built the fused CPU kernel in ") and err[1].endswith(f" s: {built.__file__}")


def test_the_build_name_follows_the_source_content_not_its_path(tmp_path, monkeypatch):
    flags = cpu.compiler_flags()
    name = cpu.build_name(flags)
    copy = tmp_path / "elsewhere" / "lem_cpu.cpp"
    copy.parent.mkdir()
    copy.write_bytes(cpu.SOURCE.read_bytes())
    monkeypatch.setattr(cpu, "SOURCE", copy)
    assert cpu.build_name(flags) == name  # another checkout or a pip-installed copy: the same build
    copy.write_bytes(cpu.SOURCE.read_bytes() + b"\n// changed\n")
    assert cpu.build_name(flags) != name
    assert cpu.build_name(flags + ["-O2"]) != cpu.build_name(flags)
    changed = cpu.build_name(flags)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cpu.build_name(flags) != changed


def test_build_ahead_of_time_prints_where_the_kernel_is():
    built = Path(cpu.load().__file__)  # built by now (or by this call) for this environment
    done = subprocess.run([sys.executable, "-m", "lem.kernels.build"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert str(built) in done.stdout and torch.__version__ in done.stdout
