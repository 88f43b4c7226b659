"""Google12: keyword spotting on Speech Commands V2, 12 classes (docs/paper.md §3.4). Paper: 95.7 % test accuracy.

    python google12/train.py              # the paper's run: downloads 2.3 GB once, caches features, 60 epochs
    python google12/train.py --url URL_OF_A_MIRROR --sha256 SHA256_OF_IT
    python google12/time_features.py                 # speed of the feature extraction here
    python -m lem.tools.bench epoch google12 --synthetic   # and of one epoch

Input: 126 steps of 80 z-scored log-mel features, input dropout --drop, LEM, linear head on y_T.
Reported: test accuracy (%) at the epoch of best validation accuracy.
"""
import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python google12/train.py): the checkout first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lem.train
from lem.train import probability
from google12.data import CLASSES, SHA256, URL, load_splits, synthetic_splits


def sha256_or_none(text):
    """An argparse type: 64 hexadecimal digits, or 'none' (checked before a 2.3 GB download, not after)."""
    if text.lower() != "none" and not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"must be 64 hexadecimal digits or 'none', got {text!r}")
    return text


sha256_or_none.__name__ = "sha256"


class Google12(lem.train.ClassificationTask):
    name = "google12"
    paper = 95.7
    defaults = dict(nhid=128, batch=100, lr=0.00089, dt=1.0, epochs=60, lr_decay_epoch=50, seed=5544)
    load, synthetic = staticmethod(load_splits), staticmethod(synthetic_splits)
    input_size, output_size = 80, len(CLASSES)

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--drop", type=probability, default=0.03, help="dropout on the input feature sequence")
        parser.add_argument("--url", default=URL, help="where to fetch speech_commands_v0.02.tar.gz")
        parser.add_argument("--sha256", type=sha256_or_none, default=SHA256, help="expected sha256 of the archive; 'none' skips the check")

    def __init__(self, args, device):
        super().__init__(args, device)
        sha256 = None if args.sha256.lower() == "none" else args.sha256
        splits = self.load(Path(args.data_dir), args.url, sha256, device)
        # float16 features stay float16 in memory (half of float32's); batches are cast to float32
        self.keep_splits(splits)

    def model_options(self):
        return {"input_dropout": self.args.drop}

    def sequences(self, x):
        return x.float().transpose(0, 1)  # (B, 126, 80) float16 → time-first (126, B, 80) float32


if __name__ == "__main__":
    lem.train.run(Google12)
