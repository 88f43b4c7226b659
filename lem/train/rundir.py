"""The run folder <experiment>/results/<run-name>/ and everything written into it: its lock (one
process per run), checkpoints (rotated, verified on loading), config.json, log.jsonl/log.txt and
summary.json, with paths relative to the repository. Files are written atomically (lem/atomic.py).
"""
import contextlib
import fcntl
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

import torch

from .. import atomic, checkout
from . import distributed
from .distributed import fail



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


def lock_folder(folder):
    """An exclusive lock on the folder itself, held as lock() holds one. Deleting run.lock cannot
    free it (the folder stays while it holds files), so no second process gets in that way. Its
    holder's PID goes to folder/run.lock, for people and for the message of a refused process.
    Raises as lock() does; OSError also where directories cannot be locked (NFS: see Run._claim)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    try:
        atomic.write_text(Path(folder) / LOCK_FILE, f"{os.getpid()}\n")
    except OSError:
        os.close(fd)
        raise
    return fd


def portable(path, root):
    """A path as a record keeps it: relative to the checkout `root` when inside it, so that run
    records copied elsewhere (docs/runs) name no folder of the machine that ran them."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def portable_args(args, root):
    """The arguments of a run with its folders made portable (see portable)."""
    return {k: portable(v, root) if k in ("data_dir", "out_dir") else v for k, v in args.items()}


def environment(device, root):
    """What config.json records beside the arguments: versions, commit, hardware."""
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("torchvision", "torchaudio", "scipy", "sktime", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)  # without importing it (sktime takes seconds)
        except importlib.metadata.PackageNotFoundError:
            pass
    commit = checkout.git_commit(root)
    device = torch.device(device)
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {"versions": versions, "git_commit": commit, "device": str(device), "hardware": hardware,
            "torch_threads": torch.get_num_threads(),
            "command": " ".join([portable(sys.argv[0], root), *sys.argv[1:]])}


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


LOCK_FILE = "run.lock"
CHECKPOINT_KEYS = ("model", "optimizer", "task", "rng", "state", "args")


class Run:
    """The run folder <experiment>/results/<run-name>/ and everything written into it (by rank 0 only).

    While a process trains the run, it (rank 0 under torchrun) holds the folder's lock: one
    process per run. A failed write stops every process and leaves the files it replaced whole."""

    def __init__(self, folder, task_cls):
        self.folder = Path(folder)
        self.task_cls = task_cls
        self.checkpoint = self.folder / "checkpoint.pt"
        self.previous = self.folder / "checkpoint.prev.pt"  # the one before, for when the newest is damaged
        self._lock = None

    @contextlib.contextmanager
    def claimed(self, resume):
        """Hold the run folder. Every process stops (rank 0 says why) when another process trains
        this run, when the folder holds a run and resume is off, or holds no checkpoint and it is on."""
        try:
            problem = self._claim(resume) if distributed.is_main() else None
            if distributed.anyone(problem is not None):
                fail(problem)
            yield
        finally:
            if self._lock is not None:
                os.close(self._lock)  # releases the lock (--seeds: the next run has its own folder)
                self._lock = None

    def _claim(self, resume):
        """Take the folder's lock before anything is written there; what forbids training here, if anything."""
        if resume and not self.folder.is_dir():
            return f"--resume: no checkpoint at {self.checkpoint}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot make the run folder {self.folder}: {e.strerror or e}"
        lock_file = self.folder / LOCK_FILE
        try:
            self._lock = self._take_lock(lock_file)
        except BlockingIOError:
            try:
                holder = lock_file.read_text().strip() or "(PID not yet written)"
            except OSError:
                holder = "(PID unknown: run.lock was removed)"
            return (f"{self.folder} is in use: process {holder} is training this run and holds its lock (the folder "
                    f"itself; its PID is in {lock_file}). Two processes on one run would overwrite each other's "
                    f"checkpoint and logs, so this one stops. Wait for that process to end (--resume then continues "
                    f"the run), or give this one another --run-name or --seed.")
        except OSError as e:  # a file system without locks, e.g. Lustre mounted with -o noflock
            print(f"warning: cannot lock {lock_file} ({e.strerror}); nothing keeps a second process off this run",
                  file=sys.stderr)
        else:
            atomic.remove_leftovers(self.folder)
        saved = self.checkpoint.exists() or self.previous.exists()
        if saved and not resume:
            return f"{self.folder} already holds a run: pass --resume to continue it, or --run-name for a new one"
        if resume and not saved:
            return f"--resume: no checkpoint at {self.checkpoint}"
        return None

    def _take_lock(self, lock_file):
        """The folder's lock (lock_folder); where a directory cannot be locked (NFS emulates flock by
        byte-range locks, which need a file open for writing), the lock of the file run.lock instead."""
        try:
            return lock_folder(self.folder)
        except BlockingIOError:
            raise
        except OSError:
            return lock(lock_file)

    def write(self, what, write):
        """write() on rank 0. If it fails (disk full, read-only folder), every process stops."""
        error = None
        if distributed.is_main():
            try:
                write()
            except OSError as e:
                error = (f"could not write {what} in {self.folder}: {e.strerror or e}. The run stops here; "
                         f"its last good checkpoint and logs are kept. Make room (or make the folder writable), "
                         f"then continue with the same command and --resume.")
        if error is not None:
            self.record_end("failed", error)
        if distributed.anyone(error is not None):
            fail(error)

    def record_end(self, status, why):
        """summary.json says how the run ended when it cannot end normally (status, and why), where
        there is a summary and room to rewrite it: what ends a run here may well stop that too."""
        path = self.folder / "summary.json"
        try:
            summary = json.loads(path.read_text())
            atomic.write_json(path, {**summary, "status": status, "error": why})
        except (OSError, ValueError, TypeError):
            pass

    def read_config(self):
        """config.json as the run's earlier segments wrote it; None (saying so) when it is missing or damaged."""
        path = self.folder / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"warning: {path} does not read ({type(e).__name__}); it is written anew from this segment",
                  file=sys.stderr)
            return None

    def how_it_ended(self):
        """How the process that trained this run before ended, by its summary.json: "killed" when it
        still says "running" (read under the lock, so that process is gone), else its status."""
        try:
            status = json.loads((self.folder / "summary.json").read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return "unknown"
        return "killed" if status == "running" else status

    def save_checkpoint(self, make):
        """Write make() as checkpoint.pt; the checkpoint it replaces becomes checkpoint.prev.pt."""
        self.write(self.checkpoint.name, lambda: atomic.rotate_checkpoint(self.checkpoint, make(), self.previous))

    def load_checkpoint(self, device):
        """The newest checkpoint that loads whole: checkpoint.pt, else (saying so) checkpoint.prev.pt.
        A damaged checkpoint.pt is then set aside as checkpoint.damaged.pt, so that the next save
        keeps checkpoint.prev.pt instead of rotating the damaged file onto it."""
        try:
            return load_checkpoint(self.checkpoint, CHECKPOINT_KEYS, device)
        except ValueError as e:
            newest = str(e)
        try:
            ckpt = load_checkpoint(self.previous, CHECKPOINT_KEYS, device)
        except ValueError as e:
            fail(f"--resume: neither checkpoint of this run loads: {newest}; {e}. Move the folder away to start "
                 f"the run anew.")
        damaged = self.folder / "checkpoint.damaged.pt"
        set_aside = distributed.is_main() and self.checkpoint.exists()

        def move():
            if set_aside:
                os.replace(self.checkpoint, damaged)
        self.write(damaged.name, move)  # on every process, as write stops them all if it fails
        if set_aside:
            newest += f", kept as {damaged.name}"
        if distributed.is_main():
            state = ckpt["state"]
            print(f"warning: {newest}; continuing from {self.previous.name} (epoch {state['epoch']}, "
                  f"batch {state['batch']})", file=sys.stderr)
        return ckpt

    def write_config(self, config):
        self.write("config.json", lambda: atomic.write_json(self.folder / "config.json", config))

    def write_logs(self, history):
        def write():
            atomic.write_text(self.folder / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            atomic.write_text(self.folder / "log.txt", "".join(format_record(r) + "\n" for r in history))
        self.write("log.jsonl and log.txt", write)

    def write_summary(self, state, status, config):
        t = self.task_cls
        best = state["best"]
        last = state["history"][-1] if state["history"] else None
        selected = best if "valid" in t.eval_splits else last
        summary = {
            "experiment": t.name, "model": config["args"]["model"], "seed": config["args"]["seed"],
            "run_name": self.folder.name, "metric": t.metric, "higher_is_better": t.higher_is_better,
            "paper": paper_figure(t, config["args"]["model"]), "baseline": t.baseline,
            "status": status, "epochs_done": state["epoch"], "steps": state["step"],
            "wall_time_s": round(state["elapsed"], 1),
            "best_epoch": selected["epoch"] if selected else None,
            "valid": selected["valid"][t.metric] if selected and "valid" in selected else None,
            "test": selected["test"][t.metric] if selected and "test" in selected else None,
            "last": last,
        }
        self.write("summary.json", lambda: atomic.write_json(self.folder / "summary.json", summary))
        return summary


def paper_figure(task_cls, model):
    """The paper's figure for `model`: Task.paper is LEM's figure, or a dict by model."""
    if isinstance(task_cls.paper, dict):
        return task_cls.paper.get(model)
    return task_cls.paper if model == "lem" else None
