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


STALE_SECONDS = 3600  # a temporary file untouched this long is no write in progress (they stream)


def cached(path, build, sources=(), params=None, notes=None, check=None):
    """build()'s result, computed once and kept in path (torch.save) beside path.json, a manifest
    of what it was made from: the sha256 of every file in sources (hashed after build(), which may
    download them) and params (seeds, sizes, processing settings). The cache is rebuilt, saying so
    in one line, when either differs, when the manifest does not parse, when the cache does not load
    or when check(result) (the caller's cheap test of its structure) is false or raises. The
    manifest also holds, for people and never compared, how long the build took and notes(result)
    if given (counts, ...). A write that fails (a full disk) is a DataError and leaves no part of
    the file; temporary files of this cache left by a killed write are removed."""
    path = Path(path)
    manifest_file = path.with_suffix(".json")
    remove_stale_temporaries(path, manifest_file)
    if path.exists() and manifest_file.exists() and all(Path(s).exists() for s in sources):
        result, problem = load_cache(path, manifest_file, made_from(sources, params), check)
        if problem is None:
            return result
        print(f"{problem}; processing again")
    started = time.time()
    result = build()
    manifest = {**made_from(sources, params), "built": {"seconds": round(time.time() - started, 1),
                                                        "torch_threads": torch.get_num_threads()}}
    if notes is not None:
        manifest["notes"] = notes(result)
    try:
        atomic.torch_save(path, result)
        atomic.write_json(manifest_file, manifest)
    except OSError as e:
        raise DataError(f"could not write the cache {path}: {e.strerror or e}; nothing half-written was left. "
                        f"Make room there (or give another --data-dir) and run again.") from None
    return result


def made_from(sources, params):
    """What a cache's manifest compares: the sha256 of each source file and the params (as JSON keeps them)."""
    return json.loads(json.dumps({"sources": {str(Path(s).resolve()): file_digest(s) for s in sources},
                                  "params": params}))


def load_cache(path, manifest_file, expected, check):
    """(the cache, None), or (None, why it must be built again)."""
    try:
        manifest = json.loads(manifest_file.read_text())
        recorded = {k: manifest.get(k) for k in ("sources", "params")}
    except (OSError, ValueError, AttributeError) as e:
        return None, f"{manifest_file} does not parse ({type(e).__name__})"
    if recorded != expected:
        return None, f"{path.name}: sources or parameters changed since it was built"
    try:
        result = torch.load(path)
    except Exception as e:  # written atomically, so only a damaged disk or a hand edit gets here
        return None, f"{path} does not load ({type(e).__name__})"
    try:
        whole = check is None or check(result)
    except Exception:  # a missing key or attribute is the answer "no"
        whole = False
    return (result, None) if whole else (None, f"{path} does not hold what it should (a cache of an older version?)")


def remove_stale_temporaries(*paths):
    """Delete the temporary files (lem/atomic.py's .<name>.*.tmp) of these files that no write has
    touched for STALE_SECONDS: what a write killed half-way left. Another process may be writing
    a fresh one right now, so those are left alone."""
    for path in paths:
        for tmp in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
            try:
                if time.time() - tmp.stat().st_mtime > STALE_SECONDS:
                    tmp.unlink()
                    print(f"removed {tmp}, left by a write cut short")
            except OSError:
                pass
