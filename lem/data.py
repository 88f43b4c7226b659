"""Where data lives (one folder for all experiments), its processed cache, padded series."""
import json
import os
from pathlib import Path

import numpy as np
import torch

from . import runlog
from .download import file_digest

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir(path=None):
    """--data-dir if given, else $LEM_DATA, else data/ at the repository root (never the cwd)."""
    chosen = path or os.environ.get("LEM_DATA") or REPO_ROOT / "data"
    return Path(chosen).expanduser().resolve()


def cached(cache_file, build, sources, params):
    """build()'s result, computed once and kept in cache_file beside a small JSON manifest.

    The manifest records the sha256 of every source file (read after build(), which may download
    them) and the processing parameters (split seed, ...); the cache is rebuilt when any differs.
    """
    cache_file = Path(cache_file)
    manifest_file = cache_file.with_suffix(".json")

    def manifest():
        return {"sources": {str(Path(s).resolve()): file_digest(s) for s in sources}, "params": params}

    if cache_file.exists() and manifest_file.exists() and all(Path(s).exists() for s in sources):
        if json.loads(manifest_file.read_text()) == json.loads(json.dumps(manifest())):
            return torch.load(cache_file)
        print(f"{cache_file.name}: sources or parameters changed since it was built; processing again")
    data = build()
    runlog.save_checkpoint(cache_file, data)
    runlog.write_json(manifest_file, manifest())
    return data


def pad_series(series):
    """Series of shapes (T_i, C) → (x, lengths): x (max T_i, N, C) float32, time-first, zero after
    each series' end; lengths (N,). Trailing NaNs (how some .ts files pad) end a series early."""
    arrays, lengths = [], []
    for i, s in enumerate(series):
        s = np.asarray(s, dtype=np.float32)
        real = np.flatnonzero(~np.isnan(s).all(axis=1))
        s = s[:real[-1] + 1] if len(real) else s[:0]
        if len(s) == 0 or np.isnan(s).any():
            raise ValueError(f"series {i} is empty or has missing values (NaN) before its end; "
                             "expected numbers up to each series' last step")
        arrays.append(torch.from_numpy(s))
        lengths.append(len(s))
    x = torch.nn.utils.rnn.pad_sequence(arrays)  # (T, N, C), zeros after each end
    return x, torch.tensor(lengths)


def padded_batch(x, lengths, idx):
    """Series idx of a zero-padded time-first tensor, cut to the batch's longest one (no step is
    run on padding only): (x[:n, idx], lengths[idx])."""
    n = int(lengths[idx].max())
    return x[:n, idx], lengths[idx]
