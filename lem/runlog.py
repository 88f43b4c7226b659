"""A run's folder: atomic writes of config, logs, summary and checkpoints.

Every file is written to a temporary name in the same folder and renamed over the old one
(os.replace is atomic), so a run killed at any moment leaves each file whole: old or new.
"""
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _atomic(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text):
    _atomic(path, lambda f: f.write(text.encode()))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_checkpoint(path, obj):
    _atomic(path, lambda f: torch.save(obj, f))


def portable(path):
    """A path as a record keeps it: relative to the repository when inside it, so that run
    records copied elsewhere (docs/runs) name no folder of the machine that ran them."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def portable_args(args):
    """The arguments of a run with its folders made portable (see portable)."""
    return {k: portable(v) if k in ("data_dir", "out_dir") else v for k, v in args.items()}


def environment(device):
    """What config.json records beside the arguments: versions, commit, hardware."""
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("torchvision", "torchaudio", "scipy", "sktime", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)  # without importing it (sktime takes seconds)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.device(device)
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {"versions": versions, "git_commit": commit, "device": str(device), "hardware": hardware,
            "torch_threads": torch.get_num_threads(),
            "command": " ".join([portable(sys.argv[0]), *sys.argv[1:]])}


def format_record(record):
    """One log.jsonl record as a line for people."""
    parts = []
    for key, value in record.items():
        if isinstance(value, dict):
            parts.extend(f"{key}_{k}={v:.6g}" if isinstance(v, float) else f"{key}_{k}={v}" for k, v in value.items())
        elif isinstance(value, float):
            parts.append(f"{key}={value:.6g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)
