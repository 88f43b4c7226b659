"""Heart-rate prediction from PPG and ECG, BIDMC32HR (docs/paper.md §3.5). Paper: LEM test RMSE 0.85.

    python heart_rate/train.py                       # the paper's run (downloads the archive once)
    python heart_rate/train.py --seeds 1 2 3         # then: python -m lem.tools.results
    python heart_rate/train.py --train-file X_TRAIN.ts --test-file X_TEST.ts   # another dataset

Any Monash-format regression .ts pair works with --train-file/--test-file (same 70/15/15 split).
Prediction = Linear(y) at each series' own last step; trained on MSE; the metric is
sqrt(sum of squared errors / N) over a whole split.
"""
import sys
from pathlib import Path

import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script (python heart_rate/train.py): the checkout first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lem.train
from lem.train.series_task import SeriesTask
from heart_rate.data import load_splits, synthetic_splits


class HeartRate(SeriesTask):
    name = "heart_rate"
    metric = "rmse"
    higher_is_better = False
    paper = 0.85
    defaults = dict(nhid=128, batch=32, lr=0.00211, dt=0.2371, epochs=500, lr_decay_epoch=250, seed=5544)
    load, synthetic = staticmethod(load_splits), staticmethod(synthetic_splits)
    output_size = 1

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--train-file", default=None, help="a regression .ts file (default: BIDMC32HR)")
        parser.add_argument("--test-file", default=None, help="its test part")

    def read_splits(self):
        return self.load(Path(self.args.data_dir), self.args.train_file, self.args.test_file)

    def run_name(self):
        a = self.args
        dataset = Path(a.train_file).stem.removesuffix("_TRAIN") if a.train_file else "BIDMC32HR"
        return f"{dataset}_{a.model}_h{a.nhid}_seed{a.seed}"

    def predict(self, model, split, idx):
        out, y = self.outputs(model, split, idx)
        return out.squeeze(-1), y

    def loss(self, model, idx):
        return F.mse_loss(*self.predict(model, "train", idx))

    def evaluate(self, model, split):
        sq_err = sum(F.mse_loss(*self.predict(model, split, idx), reduction="sum").item()
                     for idx in self.eval_batches(split))
        return {"rmse": (sq_err / len(self.splits[split][1])) ** 0.5}


if __name__ == "__main__":
    lem.train.run(HeartRate)
