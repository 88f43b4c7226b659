"""UEA/UCR classification datasets through sktime's loader, split as the reference split
EigenWorms (docs/paper.md §3.2): merge the archive's train and test parts (in that order), then
train_test_split(test_size=0.3, random_state=1234) and, on the 30 %, train_test_split(test_size=0.5,
random_state=1234) into valid and test. Labels are encoded with sklearn's LabelEncoder.

sktime downloads a dataset it does not ship once into <data_dir>/uea_ucr/<NAME>/ (its datasets
bundled in the package are read where they are); the split tensors are cached in
<data_dir>/eigenworms/<NAME>.pt with a manifest (lem.data.cached). synthetic_splits stands in
for EigenWorms with random series of its real shape (for timing without the files).
"""
from pathlib import Path

import numpy as np
import sktime.datasets
import torch
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sktime.datasets import load_UCR_UEA_dataset, tsc_dataset_names

from lem.data import DataError, cached
from lem.data.series import are_padded_splits, nested_frame_series, pad_series, padded_splits, ts_series_count

SPLIT_SEED = 1234
MIRROR = "https://timeseriesclassification.com/aeon-toolkit/{}.zip"  # what sktime falls back to
KNOWN = set(tsc_dataset_names.univariate) | set(tsc_dataset_names.multivariate)
BUNDLED = Path(sktime.datasets.__file__).parent / "data"
PAPER_COUNTS = {"EigenWorms": 259}  # series in train + test (docs/paper.md §3.2)


def source_folder(name, data_dir):
    """Where sktime finds <name>/<name>_TRAIN.ts and _TEST.ts: in its package, else our data folder."""
    return BUNDLED if (BUNDLED / name / f"{name}_TRAIN.ts").exists() else Path(data_dir) / "uea_ucr"


def read_dataset(name, folder):
    """(series as (T_i, C) arrays, string labels) of the train part followed by the test part."""
    folder.mkdir(parents=True, exist_ok=True)  # sktime creates only the last level
    try:
        X, y = load_UCR_UEA_dataset(name, extract_path=None if folder == BUNDLED else str(folder))
    except Exception as e:  # sktime raises RuntimeError (or OSError) when every mirror fails
        reason = str(e).replace("\n", "; ")
        files = [folder / name / f"{name}_{part}.ts" for part in ("TRAIN", "TEST")]
        if all(f.exists() for f in files):  # there, but not a .ts sktime parses
            raise DataError(f"{files[0]} or {files[1]} is not a readable .ts file ({reason[:300]}): cut short or "
                            f"damaged. Delete {folder / name} to download it again.") from None
        raise DataError(f"could not get the UEA/UCR dataset {name} through sktime ({reason}). "
                         f"Download {MIRROR.format(name)} by hand and unzip it so that "
                         f"{folder / name / (name + '_TRAIN.ts')} and _TEST.ts exist.") from None
    try:
        return nested_frame_series(X), y
    except DataError as e:
        raise DataError(f"{name}: {e}") from None


def split(n):
    """Index arrays (train, valid, test) of docs/paper.md §3.2."""
    train, rest = train_test_split(np.arange(n), test_size=0.3, random_state=SPLIT_SEED)
    valid, test = train_test_split(rest, test_size=0.5, random_state=SPLIT_SEED)
    return {"train": train, "valid": valid, "test": test}


def build(name, folder):
    series, labels = read_dataset(name, folder)
    check_count(name, folder, len(series))
    x, lengths = pad_series(series)
    encoder = LabelEncoder().fit(labels)
    y = torch.from_numpy(encoder.transform(labels)).long()
    return {"splits": padded_splits(x, y, lengths, split(len(y))), "classes": [str(c) for c in encoder.classes_]}


def load_splits(name, data_dir):
    """{'splits': {part: (x (T, N, C) float, y (N,) long, lengths (N,))}, 'classes': [...]}."""
    if name not in KNOWN and not (BUNDLED / name / f"{name}_TRAIN.ts").exists():
        raise DataError(f"--dataset {name!r} is not a UEA/UCR classification dataset sktime knows; expected one of "
                        f"sktime.datasets.tsc_dataset_names.univariate or .multivariate, e.g. EigenWorms")
    folder = source_folder(name, data_dir)
    sources = [folder / name / f"{name}_{part}.ts" for part in ("TRAIN", "TEST")]
    params = {"dataset": name, "merge": "train+test", "split": "train_test_split 0.3 then 0.5",
              "split_seed": SPLIT_SEED, "labels": "LabelEncoder", "layout": "time-first, zero-padded"}
    return cached(Path(data_dir) / "eigenworms" / f"{name}.pt", lambda: build(name, folder), sources, params,
                  check=lambda d: are_padded_splits(d["splits"]) and isinstance(d["classes"], list))


def check_count(name, folder, n):
    """A DataError naming the files when a dataset of the paper has fewer (or more) series than it should:
    a .ts file cut at a line boundary still parses."""
    if name in PAPER_COUNTS and n != PAPER_COUNTS[name]:
        files = [folder / name / f"{name}_{part}.ts" for part in ("TRAIN", "TEST")]
        held = " and ".join(f"{f} {ts_series_count(f)}" for f in files if f.exists())
        raise DataError(f"{name} has {PAPER_COUNTS[name]} series (docs/paper.md §3.2), its files hold {n} ({held}): "
                        f"one is cut short or damaged. Delete {folder / name} to download it again.")


def synthetic_splits(name, data_dir, n=259, length=17984, channels=6, classes=5):
    """What load_splits returns, for random series of EigenWorms' shape (docs/paper.md §3.2) split as the real ones."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(length, n, channels, generator=g), torch.randint(0, classes, (n,), generator=g)
    splits = {part: (x[:, idx].contiguous(), y[idx], torch.full((len(idx),), length))
              for part, idx in ((p, torch.from_numpy(i)) for p, i in split(n).items())}
    return {"splits": splits, "classes": [str(c) for c in range(classes)]}
