"""Where the repository's checkout is, for the research tools and the run records. Never derived
from where the lem package is installed (a pip-installed lem lives in site-packages): a checkout is
found from the current folder, or from an experiment package that a train.py has put on sys.path.

A checkout is a folder that holds lem/ and pyproject.toml; its experiments are the sub-folders
that are Python packages with a train.py (smnist/, ptb/, ...).
"""
import importlib.util
import subprocess
from pathlib import Path


class NotACheckout(RuntimeError):
    """A research tool was run outside a checkout of the repository (its message is one line)."""


def is_checkout(folder):
    folder = Path(folder)
    return (folder / "lem" / "__init__.py").is_file() and (folder / "pyproject.toml").is_file()


def root(start=None):
    """The checkout at or above `start` (default: the current folder), or None outside one."""
    here = Path(start or Path.cwd()).resolve()
    return next((folder for folder in (here, *here.parents) if is_checkout(folder)), None)


def required_root(start=None):
    """root(), or NotACheckout saying where it looked."""
    found = root(start)
    if found is None:
        here = Path(start or Path.cwd()).resolve()
        raise NotACheckout(f"{here} is not inside a checkout of the LEM repository (no folder at or above it holds "
                           f"lem/ and pyproject.toml): run this from the checkout (git clone it first)")
    return found


def experiments(folder):
    """The experiment names of the checkout `folder`, sorted."""
    return sorted(p.parent.name for p in Path(folder).glob("*/train.py") if (p.parent / "__init__.py").is_file())


def experiment_dir(name):
    """The folder of the importable experiment package `name` (its train.py put the checkout on
    sys.path), or None when no such package is importable."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def git_commit(folder):
    """The commit checked out in `folder`, or "not a git checkout"."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "not a git checkout"
