"""Atomic file writing: every file is written to a temporary name in its folder and renamed over
the old one (os.replace is atomic), so a process killed at any moment leaves each file whole,
old or new. Run folders (config, logs, summary, checkpoints) and dataset caches use it."""
import io
import json
import os
import tempfile
from pathlib import Path

import torch


def umask():
    """The process's umask (os.umask can only read it by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file(path, write, keep=None):
    """write(f) into a temporary file, then rename it to path. With keep, the file path held is
    renamed to keep first: at every instant one whole file exists, under one name or the other.
    The file gets the mode open() would give it (0o666 less the umask), not mkstemp's 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep is not None and path.exists():
            os.replace(path, keep)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text):
    write_file(path, lambda f: f.write(text.encode()))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


class _Remembering:
    """A file whose write() remembers the OSError it raised (a full disk): torch's zip writer turns
    that into an opaque RuntimeError, which torch_save turns back."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.file.flush()


def torch_save(path, obj):
    """torch.save(obj) to path, streamed (a dataset cache may be gigabytes); a failed write raises
    its own OSError (e.g. ENOSPC), as in rotate_checkpoint."""
    def write(f):
        remembering = _Remembering(f)
        try:
            torch.save(obj, remembering)
        except Exception:  # the write's own OSError, or torch's RuntimeError around it
            if remembering.error is not None:
                raise remembering.error from None
            raise
    write_file(path, write)


def rotate_checkpoint(path, obj, previous):
    """torch.save(obj) to path; the checkpoint that path held becomes previous (see write_file).

    Serialised in memory first: a full disk then fails in our own write as a plain OSError,
    where inside torch's zip writer it would surface as an opaque RuntimeError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_file(path, lambda f: f.write(buffer.getbuffer()), keep=previous)


def remove_leftovers(folder):
    """Delete the temporary files of writes cut short (by a kill -9) in folder. Only for the
    holder of the folder's lock: anyone else may be writing them right now."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
