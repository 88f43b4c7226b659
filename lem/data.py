"""Where data lives: one folder for all experiments."""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir(path=None):
    """--data-dir if given, else $LEM_DATA, else data/ at the repository root (never the cwd)."""
    chosen = path or os.environ.get("LEM_DATA") or REPO_ROOT / "data"
    return Path(chosen).expanduser().resolve()
