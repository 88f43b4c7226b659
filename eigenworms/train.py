"""EigenWorms (SPEC §3.2), or any UEA/UCR classification dataset sktime's loader knows.
Paper: LEM test accuracy 92.3 %, a mean over seeds.

    python eigenworms/train.py                               # the paper's run, seed 5544
    python eigenworms/train.py --seeds 1 2 3 4 5             # then: python -m lem.results
    python eigenworms/train.py --dataset JapaneseVowels      # another dataset, same split

Logits = Linear(y) at each series' own last step (series of unequal length are zero-padded;
the padding is never read). Valid and test are evaluated in chunks of --eval_batch series (the
reference: each as one batch; the same figures up to float rounding). Its epoch time:
`python -m lem.bench epoch eigenworms --synthetic` (docs/timeseries.md).
"""
from pathlib import Path

import torch
import torch.nn.functional as F

import lem
from lem.data import padded_batch
from lem.harness import at_least
from data import load_splits, synthetic_splits


class UEAClassification(lem.Task):
    name = "eigenworms"
    metric = "accuracy"
    higher_is_better = True
    paper = 92.3
    defaults = dict(nhid=32, batch=8, lr=0.00609, dt=0.00017, epochs=50, seed=5544)
    load, synthetic = staticmethod(load_splits), staticmethod(synthetic_splits)

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--dataset", default="EigenWorms", help="a UEA/UCR classification dataset name")
        parser.add_argument("--eval-batch", type=at_least(1), default=256, help="series per evaluation chunk")

    def __init__(self, args, device):
        super().__init__(args, device)
        data = self.load(args.dataset, Path(args.data_dir))
        self.classes = data["classes"]
        self.splits = {k: tuple(t.to(device) for t in v) for k, v in data["splits"].items()}

    def run_name(self):
        a = self.args
        return f"{a.dataset}_{a.model}_h{a.nhid}_seed{a.seed}"

    def build_model(self):
        a, x = self.args, self.splits["train"][0]
        return lem.RNNModel(a.model, x.size(-1), a.nhid, len(self.classes), dt=a.dt, backend=a.backend)

    def train_batches(self, epoch):
        return lem.shuffled_batches(len(self.splits["train"][1]), self.args.batch, self.args.seed, epoch)

    def logits(self, model, split, idx):
        x, y, lengths = self.splits[split]
        idx = idx.to(self.device)
        return model(*padded_batch(x, lengths, idx)), y[idx]

    def loss(self, model, idx):
        return F.cross_entropy(*self.logits(model, "train", idx))

    def evaluate(self, model, split):
        correct, n = 0, len(self.splits[split][1])
        for idx in lem.batches_in_order(n, self.args.eval_batch):
            logits, y = self.logits(model, split, idx)
            correct += (logits.argmax(-1) == y).sum().item()
        return {"accuracy": 100.0 * correct / n}


if __name__ == "__main__":
    lem.run(UEAClassification)
