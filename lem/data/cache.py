"""What every experiment's data code shares: DataError, the one data folder and the
processed-data cache."""
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .. import atomic, checkout


class DataError(ValueError):
    """Data missing, corrupt or unusable as asked. Its message is one paragraph saying what is wrong
    and what to do (which file to fetch from where, what to delete); the harness prints it and
    stops with exit code 1, without a traceback."""


def data_dir(path=None):
    """--data-dir if given, else $LEM_DATA, else data/ at the root of the checkout the current folder
    is in, else data/ in the current folder."""
    chosen = path or os.environ.get("LEM_DATA") or (checkout.root() or Path.cwd()) / "data"
    return Path(chosen).expanduser().resolve()


def file_digest(path, algorithm="sha256"):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached(path, build, sources=(), params=None, notes=None):
    """build()'s result, computed once and kept in path (torch.save) beside path.json, a manifest
    of what it was made from: the sha256 of every file in sources (hashed after build(), which may
    download them) and params (seeds, sizes, processing settings). The cache is rebuilt when
    either differs, or when it does not load. The manifest also holds, for people and never
    compared, how long the build took and notes(result) if given (counts, ...)."""
    path = Path(path)
    manifest_file = path.with_suffix(".json")

    def made_from():
        return json.loads(json.dumps({"sources": {str(Path(s).resolve()): file_digest(s) for s in sources},
                                      "params": params}))

    if path.exists() and manifest_file.exists() and all(Path(s).exists() for s in sources):
        manifest = json.loads(manifest_file.read_text())
        if {k: manifest.get(k) for k in ("sources", "params")} == made_from():
            try:
                return torch.load(path)
            except Exception as e:  # written atomically, so only a damaged disk or a hand edit gets here
                print(f"{path} does not load ({type(e).__name__}); processing again")
        else:
            print(f"{path.name}: sources or parameters changed since it was built; processing again")
    started = time.time()
    result = build()
    atomic.torch_save(path, result)
    manifest = {**made_from(), "built": {"seconds": round(time.time() - started, 1),
                                         "torch_threads": torch.get_num_threads()}}
    if notes is not None:
        manifest["notes"] = notes(result)
    atomic.write_json(manifest_file, manifest)
    return result
