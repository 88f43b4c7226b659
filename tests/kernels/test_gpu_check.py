"""The GPU check's plumbing (benchmarks/gpu_check.py), here without a GPU: its dry run (the same
steps on CPU tensors under TRITON_INTERPRET=1, tiny sizes) writes each step's output and exit status
to $OUT, flat and few files; a step that fails or runs past its limit does not stop the next; the
GPU tests and the bench need no experiment-only package."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO

pytest.importorskip("triton")
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")  # a script, not a package
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def read_steps(out):
    lines = (out / "steps.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["step", "rc", "seconds"]
    return {row[0]: row for row in (line.split("\t") for line in lines[1:])}


def test_dry_run_runs_every_step_and_writes_what_comes_back(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=300)
    steps = read_steps(tmp_path)
    assert list(steps) == ["nvidia-smi", "python", "tests", "bench", "fhn"], done.stdout[-3000:]
    if shutil.which("nvidia-smi") is None:  # a failing first step: recorded, and the others ran all the same
        assert steps["nvidia-smi"][1] == "127" and done.returncode == 1
    scipy_here = importlib.util.find_spec("scipy") is not None  # the fhn step needs it (the layer-only CI run has none)
    for name in ("python", "tests", "bench", "fhn"):
        if name == "fhn" and not scipy_here:
            assert steps[name][1] == "None" and "scipy absent" in steps[name][-1], steps[name]
            continue
        assert steps[name][1] == "0", (name, (tmp_path / f"{list(steps).index(name) + 1}_{name}.log").read_text()[-3000:])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert all((tmp_path / f).is_file() for f in files) and len(files) <= 8, files  # what the device returns
    logs = {f.split("_", 1)[1][:-4]: (tmp_path / f).read_text() for f in files if f.endswith(".log")}
    assert "TRITON_INTERPRET 1" in logs["python"] and "triton" in logs["python"]
    assert " passed" in logs["tests"] and " failed" not in logs["tests"]
    for row in ("| onchip |", "| stepwise |", "| nn.LSTM |", "| precision |"):
        assert row in logs["bench"]
    assert "done: rmse on test" in logs["fhn"] or not scipy_here
    assert done.stdout.rstrip().endswith(logs["bench"].rstrip())  # the bench tables come last


def test_a_failing_or_hanging_step_does_not_stop_the_next(tmp_path):
    py = [sys.executable, "-u", "-c"]
    plan = [("fails", [*py, "import sys; print('about to fail'); sys.exit(3)"], ()),
            ("hangs", [*py, "import time; print('started'); time.sleep(120)"], ()),
            ("needs", [*py, "print('never')"], ("no_such_module_here",)),
            ("runs", [*py, "print('ran')"], ())]
    limits = {"fails": 20, "hangs": 2, "needs": 20, "runs": 20}
    rows = check.run_all(plan, tmp_path, dict(os.environ), tmp_path / "no_cache", limits)
    assert [(name, rc, note) for name, rc, _, _, _, note in rows] == [
        ("fails", 3, ""), ("hangs", -9, "timed out"), ("needs", None, "not run: no_such_module_here absent"),
        ("runs", 0, "")]
    assert rows[1][2] < 20  # stopped at its limit
    assert (tmp_path / "2_hangs.log").read_text() == "started\n"  # written as it came, before the stop
    assert (tmp_path / "4_runs.log").read_text() == "ran\n"
    assert read_steps(tmp_path)["hangs"][1:2] == ["-9"]


def test_the_limits_add_up_to_six_minutes():
    assert sum(check.LIMITS.values()) <= 360
    assert [name for name, _, _ in check.steps(False, REPO)] == list(check.LIMITS)


BLOCKER = """
import sys
for name in ("sktime", "soundfile", "torchaudio", "torchvision", "scipy", "pandas", "sklearn", "tqdm", "requests",
             "matplotlib", "optuna"):  # the [experiments] extra
    sys.modules[name] = None  # import name: ImportError; importlib.util.find_spec(name): None, as if absent
"""


def test_gpu_tests_and_bench_need_no_experiment_only_package():
    """Collecting the GPU tests and running the kernels bench with the experiments' packages
    blocked (the GPU machine may lack them)."""
    tests = str(check.find("tests/**/test_gpu_tiers.py"))
    code = BLOCKER + f"""
import pytest
assert pytest.main(["-q", "--collect-only", "-p", "no:cacheprovider", {tests!r}]) == 0
from {check.bench_module()} import CONFIGS, main
CONFIGS["tiny"] = (4, 3, 8, 2)
main(["kernels", "--devices", "cpu", "--configs", "tiny", "--repeats", "1", "--budget", "1"])
"""
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "| stepwise |" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
