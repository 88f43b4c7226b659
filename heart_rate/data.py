"""BIDMC32HR heart-rate regression (docs/paper.md §3.5), or any Monash-format regression .ts pair.

The Monash/UEA/UCR time-series regression archive is one zip of every dataset (Zenodo record
3902651, the URL the reference used): downloaded once to <data_dir>/heart_rate/, resumable; only
the two BIDMC32HR files are extracted, to <data_dir>/heart_rate/BIDMC32HR/, and read with
sktime's .ts reader. Placing those two files there by hand skips the download.

Split as the reference: merge train and test (7949 series), torch random_split into
[5565, 2384], then the 2384 into [1192 test, 1192 valid], each with a fresh
torch.Generator().manual_seed(123456). For other sizes the same 70/30 and 50/50 fractions.
synthetic_splits stands in with random series of BIDMC32HR's shape (for timing without the files).
"""
from pathlib import Path

import numpy as np
import torch
from sktime.datasets import load_from_tsfile

from lem.data import DataError, cached
from lem.data.series import are_padded_splits, nested_frame_series, pad_series, padded_splits
from lem.data.download import download, extract

ARCHIVE_URL = "https://zenodo.org/record/3902651/files/Monash_UEA_UCR_Regression_Archive.zip?download=1"
ARCHIVE_NAME = "Monash_UEA_UCR_Regression_Archive.zip"
DATASET = "BIDMC32HR"
SPLIT_SEED = 123456
PAPER_COUNT = 7949  # BIDMC32HR's series, train + test (docs/paper.md §3.5)


def bidmc32hr_files(data_dir, url=ARCHIVE_URL):
    """Paths of BIDMC32HR_TRAIN.ts and _TEST.ts, downloading and extracting them if needed."""
    folder = Path(data_dir) / "heart_rate"
    files = [folder / DATASET / f"{DATASET}_{part}.ts" for part in ("TRAIN", "TEST")]
    if not all(f.exists() for f in files):
        archive = download(url, folder / ARCHIVE_NAME)
        extract(archive, [f"{DATASET}/{f.name}" for f in files], folder / DATASET, url=url)
    return files


def read_ts(path):
    """(series as (T_i, C) arrays, float targets) of one regression .ts file, via sktime."""
    try:
        X, y = load_from_tsfile(str(path), return_data_type="nested_univ", y_dtype="float")
    except Exception as e:  # sktime's TsFileParseException, OSError, ...
        raise DataError(f"{path}: not a readable regression .ts file with @targetlabel true ({e}); expected "
                         "the Monash archive's format (http://tseregression.org)") from None
    try:
        return nested_frame_series(X), y
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def split(n):
    """Index tensors (train, valid, test) of docs/paper.md §3.5."""
    def random_split(data, fractions):
        parts = torch.utils.data.random_split(data, fractions, generator=torch.Generator().manual_seed(SPLIT_SEED))
        return [data[part.indices] for part in parts]

    if n < 7:
        raise DataError(f"{n} series are too few to split 70/15/15; expected at least 7")
    train, rest = random_split(torch.arange(n), [0.7, 0.3])
    test, valid = random_split(rest, [0.5, 0.5])  # the reference's order: test first
    return {"train": train, "valid": valid, "test": test}


def build(train_file, test_file):
    (a, ya), (b, yb) = read_ts(train_file), read_ts(test_file)
    if train_file.name == f"{DATASET}_TRAIN.ts" and len(a) + len(b) != PAPER_COUNT:
        raise DataError(f"{DATASET} has {PAPER_COUNT} series (docs/paper.md §3.5), {train_file} and {test_file} hold "
                        f"{len(a)} + {len(b)}: one is cut short or damaged. Delete it to extract it again.")
    x, lengths = pad_series(a + b)
    y = torch.from_numpy(np.concatenate([ya, yb]).astype(np.float32))
    return padded_splits(x, y, lengths, split(len(y)))


def load_splits(data_dir, train_file=None, test_file=None):
    """{part: (x (T, N, C) float, y (N,) float, lengths (N,))}; BIDMC32HR unless files are given."""
    if (train_file is None) != (test_file is None):
        raise DataError("expected both --train-file and --test-file, or neither (BIDMC32HR)")
    if train_file is None:
        train_file, test_file = bidmc32hr_files(data_dir)
    train_file, test_file = Path(train_file), Path(test_file)
    for f in (train_file, test_file):
        if not f.is_file():
            raise DataError(f"{f} does not exist; expected a regression .ts file")
    name = train_file.stem.removesuffix("_TRAIN")
    params = {"merge": "train+test", "split": "random_split 0.7/0.3 then 0.5/0.5 (test, valid)",
              "split_seed": SPLIT_SEED, "layout": "time-first, zero-padded"}
    return cached(Path(data_dir) / "heart_rate" / f"{name}.pt", lambda: build(train_file, test_file),
                  [train_file, test_file], params, check=are_padded_splits)


def synthetic_splits(data_dir, train_file=None, test_file=None, n=7949, length=4000, channels=2):
    """What load_splits returns, for random series of BIDMC32HR's shape (docs/paper.md §3.5) split as the real ones."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(length, n, channels, generator=g), 60 + 40 * torch.rand(n, generator=g)
    return {part: (x[:, idx].contiguous(), y[idx], torch.full((len(idx),), length)) for part, idx in split(n).items()}
