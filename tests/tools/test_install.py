"""As a user installs it: the wheel built from this checkout, installed (not editable, without its
dependencies) into a fresh virtual environment that reuses this Python's packages (torch), and
used from a folder outside any checkout: the layer trains on the fused C++ backend, and every
research tool answers --help and, outside a checkout, one clear line instead of a traceback."""
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parents[2]
WHEEL_SOURCES = ("lem", "pyproject.toml", "README.md", "LICENSE")  # what the wheel is built from
TOOLS = ("lem.tools.results", "lem.tools.reproduce", "lem.tools.bench", "lem.tools.tune", "lem.kernels.build")

TRAIN = """
import json, sys, warnings
from pathlib import Path
import torch
import lem
from lem import kernels
from lem.data.cache import data_dir
from lem.train import rundir

torch.manual_seed(0)
model = lem.LEM(3, 16, num_layers=2, backend="cpp")
head = torch.nn.Linear(16, 1)
optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
x, target = torch.randn(30, 8, 3), torch.randn(8, 1)
losses = []
for step in range(8):
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(head(model(x)[0][-1]), target)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(json.dumps({"lem": lem.__file__, "cpp_error": repr(kernels._broken.get("cpp", "never tried")),
                  "losses": losses, "data_dir": str(data_dir()),
                  "commit": rundir.environment("cpu", Path.cwd())["git_commit"]}))
"""

# what only the [experiments] extra brings: the layer must import and run without any of them
EXTRAS = ("tqdm", "requests", "scipy", "sklearn", "sktime", "soundfile", "matplotlib", "torchvision", "torchaudio",
          "optuna")
LAYER_ALONE = f"""
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ImportError(name + " is not installed")
sys.meta_path.insert(0, Missing())
import torch, lem
from lem.kernels import build
lem.LEM(3, 8, num_layers=2, backend="cpp")(torch.randn(10, 2, 3))[0].sum().backward()
print(repr(lem.kernels._broken.get("cpp", "never tried")))
"""


def _run(args, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LEM_DATA")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, **kwargs)


def _checked(args, cwd):
    done = _run(args, cwd)
    assert done.returncode == 0, f"{' '.join(map(str, args))}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's python, a folder outside any checkout)."""
    if int(version("setuptools").split(".")[0]) < 77:
        pytest.skip("building the wheel needs setuptools>=77 (pip install -r requirements.txt brings it)")
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a clean copy: setuptools' build/ folder stays out of the checkout
    for name in WHEEL_SOURCES:
        copy = shutil.copytree if (CHECKOUT / name).is_dir() else shutil.copy
        copy(CHECKOUT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                if copy is shutil.copytree else {}))
    _checked([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "wheel",
              source], tmp)
    (wheel,) = (tmp / "wheel").glob("long_expressive_memory-*.whl")
    _checked([sys.executable, "-m", "venv", "--system-site-packages", tmp / "venv"], tmp)
    python = tmp / "venv" / "bin" / "python"
    # --ignore-installed: the checkout's own editable install is visible through the system site
    _checked([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel], tmp)
    outside = tmp / "outside"
    outside.mkdir()
    return python, outside


def test_the_installed_layer_trains_on_the_fused_backend_outside_a_checkout(installed):
    python, outside = installed
    done = _checked([python, "-c", TRAIN], outside)
    result = json.loads(done.stdout.splitlines()[-1])
    assert Path(result["lem"]).is_relative_to(python.parent.parent), result["lem"]  # the venv's copy
    assert result["cpp_error"] == "None", result["cpp_error"]  # built or found, and used
    assert result["losses"][-1] < result["losses"][0]
    assert result["data_dir"] == str(outside.resolve() / "data")
    assert result["commit"] == "not a git checkout"


def test_the_layer_needs_nothing_of_the_experiments_extra():
    done = _checked([sys.executable, "-c", LAYER_ALONE], CHECKOUT)  # -c: the checkout's lem, from its root
    assert done.stdout.splitlines()[-1] == "None"


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_answers_help(installed, tool):
    python, outside = installed
    done = _checked([python, "-m", tool, "--help"], outside)
    assert done.stdout.startswith(f"usage: python -m {tool}")


@pytest.mark.parametrize("call", [["lem.tools.results"], ["lem.tools.reproduce", "somewhere"],
                                  ["lem.tools.bench", "epoch", "smnist"],
                                  ["lem.tools.tune", "fitzhugh_nagumo", "--model", "lem", "--trials", "1"]])
def test_a_research_tool_outside_a_checkout_says_so_in_one_line(installed, call):
    python, outside = installed
    done = _run([python, "-m", *call], outside)
    assert done.returncode != 0
    assert done.stdout == "" and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"python -m {call[0]}: ") and "is not inside a checkout of the LEM repository" in line


def test_the_kernel_builds_ahead_of_time_outside_a_checkout(installed):
    python, outside = installed
    done = _checked([python, "-m", "lem.kernels.build"], outside)
    (built,) = [line.strip() for line in done.stdout.splitlines() if line.strip().endswith(".so")]
    assert Path(built).is_file()
