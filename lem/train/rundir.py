"""What a run folder holds besides its files' writing (lem/atomic.py): the folder's lock,
checkpoints verified on loading, and what config.json and log.txt record (the environment,
paths relative to the repository, log lines). REPO_ROOT is the repository's folder."""
import fcntl
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]


def load_checkpoint(path, keys, map_location=None):
    """The dict torch.load reads from path, verified to hold every one of keys; a ValueError
    saying what is wrong (missing, truncated or damaged, incomplete) otherwise."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} is missing")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a damaged file fails anywhere in unzip or unpickle: EOFError, RuntimeError, ...
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} does not load: truncated or damaged ({type(e).__name__}: {reason})") from e
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(f"{path} is not a whole checkpoint: it lacks {', '.join(missing)}")
    return obj


def lock(path):
    """An exclusive lock on the file path (created if need be), held until the returned file
    descriptor is closed or this process ends, however it ends: the kernel releases it, so a
    kill -9 leaves no stale lock. The file then holds this process's PID. Raises
    BlockingIOError when another process holds the lock, OSError when the file system has none."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


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
