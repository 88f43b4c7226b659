"""Variable-length series (EigenWorms, heart rate: docs/paper.md §3.2, §3.5) as zero-padded
time-first tensors with their lengths."""
import numpy as np
import torch

from .cache import DataError


def pad_series(series):
    """Series of shapes (T_i, C) → (x, lengths): x (max T_i, N, C) float32, time-first, zero after
    each series' end; lengths (N,). Trailing NaNs (how some .ts files pad) end a series early."""
    arrays, lengths = [], []
    for i, s in enumerate(series):
        s = np.asarray(s, dtype=np.float32)
        real = np.flatnonzero(~np.isnan(s).all(axis=1))
        s = s[:real[-1] + 1] if len(real) else s[:0]
        if len(s) == 0 or np.isnan(s).any():
            raise DataError(f"series {i} is empty or has missing values (NaN) before its end; "
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


def nested_frame_series(X):
    """The series of an sktime nested frame (one row a series, one column a channel, each cell a
    pd.Series) as (T_i, C) arrays; a DataError when the channels of a series differ in length."""
    series = [[X.iat[i, c].to_numpy() for c in range(X.shape[1])] for i in range(len(X))]
    if any(len({len(channel) for channel in s}) != 1 for s in series):
        raise DataError("the channels of a series have different lengths; expected one length per series")
    return [np.stack(s, axis=1) for s in series]


def are_padded_splits(splits, parts=("train", "valid", "test")):
    """Whether splits is what padded_splits makes for these parts: (x (T, N, C), targets (N,),
    lengths (N,)) tensors each (the structure check of a cache, lem.data.cached)."""
    return set(splits) == set(parts) and all(
        len(t) == 3 and all(isinstance(v, torch.Tensor) for v in t) and t[0].dim() == 3
        and len(t[1]) == len(t[2]) == t[0].size(1) for t in splits.values())


def ts_series_count(path):
    """The series a .ts file holds: its non-blank lines after @data (one series a line)."""
    with open(path, errors="replace") as f:
        for line in f:
            if line.strip().lower().startswith("@data"):
                break
        return sum(1 for line in f if line.strip())


def padded_splits(x, targets, lengths, parts):
    """{part: (x (T_part, N_part, C), targets, lengths)} for the index sets `parts` of padded series
    (x, targets, lengths), each part cut to its longest series."""
    splits = {}
    for part, idx in parts.items():
        idx = torch.as_tensor(idx)
        n = int(lengths[idx].max())
        splits[part] = (x[:n, idx].contiguous(), targets[idx], lengths[idx])
    return splits
