"""The experiment folders of the repository and their Task classes, imported by path. Every folder
has its own data.py, so a train.py's `from data import ...` must find its own folder's."""
import importlib.util
import sys
from pathlib import Path

from .harness import Task
from .runlog import REPO_ROOT

EXPERIMENTS = sorted(p.parent.name for p in REPO_ROOT.glob("*/train.py"))


def load_file(path, name=None):
    """Import the Python file at path (relative to the repository, or absolute) as the module
    sys.modules[name] (default name: from its path, e.g. smnist_train; the harness finds a Task's
    experiment folder through it), with its folder first on sys.path while it loads."""
    path = REPO_ROOT / path
    name = name or "_".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    cached = sys.modules.get("data")
    if cached is not None and Path(getattr(cached, "__file__", "") or "").parent != path.parent:
        del sys.modules["data"]  # another experiment's data.py must not answer for this one's
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def task_class(experiment, argv=()):
    """The Task class `python <experiment>/train.py ARGV` trains: the module's task_for(argv) where
    it has one (PTB: the class depends on --level), else the one Task subclass it defines."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {experiment!r}")
    module = load_file(f"{experiment}/train.py")
    if hasattr(module, "task_for"):
        return module.task_for(list(argv))
    (task,) = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, Task) and v.__module__ == module.__name__]
    return task
