"""EigenWorms (docs/paper.md §3.2), or any UEA/UCR classification dataset sktime's loader knows.
Paper: LEM test accuracy 92.3 %, a mean over seeds.

    python eigenworms/train.py                               # the paper's run, seed 5544
    python eigenworms/train.py --seeds 1 2 3 4 5             # then: python -m lem.tools.results
    python eigenworms/train.py --dataset JapaneseVowels      # another dataset, same split

Logits = Linear(y) at each series' own last step (series of unequal length are zero-padded;
the padding is never read). Valid and test are evaluated in chunks sized by memory (Task.eval_chunk;
the reference: each as one batch; the same figures up to float rounding). Its epoch time:
`python -m lem.tools.bench epoch eigenworms --synthetic` (docs/timeseries.md).
"""
import sys
from pathlib import Path

import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script (python eigenworms/train.py): the checkout first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lem.train
from lem.train.series_task import SeriesTask
from eigenworms.data import load_splits, synthetic_splits


class UEAClassification(SeriesTask):
    name = "eigenworms"
    metric = "accuracy"
    higher_is_better = True
    paper = 92.3
    defaults = dict(nhid=32, batch=8, lr=0.00609, dt=0.00017, epochs=50, seed=5544)
    load, synthetic = staticmethod(load_splits), staticmethod(synthetic_splits)

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--dataset", default="EigenWorms", help="a UEA/UCR classification dataset name")

    def read_splits(self):
        data = self.load(self.args.dataset, Path(self.args.data_dir))
        self.classes = data["classes"]
        self.output_size = len(self.classes)
        return data["splits"]

    def run_name(self):
        a = self.args
        return f"{a.dataset}_{a.model}_h{a.nhid}_seed{a.seed}"

    def loss(self, model, idx):
        return F.cross_entropy(*self.outputs(model, "train", idx))

    def evaluate(self, model, split):
        correct = 0
        for idx in self.eval_batches(split):
            logits, y = self.outputs(model, split, idx)
            correct += (logits.argmax(-1) == y).sum().item()
        return {"accuracy": 100.0 * correct / len(self.splits[split][1])}


if __name__ == "__main__":
    lem.train.run(UEAClassification)
