"""Heart-rate prediction from PPG and ECG, BIDMC32HR (SPEC §3.5). Paper: LEM test RMSE 0.85.

    python heart_rate/train.py                       # the paper's run (downloads the archive once)
    python heart_rate/train.py --seeds 1 2 3         # then: python -m lem.results
    python heart_rate/train.py --train-file X_TRAIN.ts --test-file X_TEST.ts   # another dataset

Any Monash-format regression .ts pair works with --train-file/--test-file (same 70/15/15 split).
Prediction = Linear(y) at each series' own last step; trained on MSE; the metric is
sqrt(sum of squared errors / N) over a whole split.
"""
from pathlib import Path

import torch.nn.functional as F

import lem
from lem.data import padded_batch
from lem.harness import at_least
from data import load_splits, synthetic_splits


class HeartRate(lem.Task):
    name = "heart_rate"
    metric = "rmse"
    higher_is_better = False
    paper = 0.85
    defaults = dict(nhid=128, batch=32, lr=0.00211, dt=0.2371, epochs=500, lr_decay_epoch=250, seed=5544)
    load, synthetic = staticmethod(load_splits), staticmethod(synthetic_splits)

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--train-file", default=None, help="a regression .ts file (default: BIDMC32HR)")
        parser.add_argument("--test-file", default=None, help="its test part")
        parser.add_argument("--eval-batch", type=at_least(1), default=256, help="series per evaluation chunk")

    def __init__(self, args, device):
        super().__init__(args, device)
        splits = self.load(Path(args.data_dir), args.train_file, args.test_file)
        self.splits = {k: tuple(t.to(device) for t in v) for k, v in splits.items()}

    def run_name(self):
        a = self.args
        dataset = Path(a.train_file).stem.removesuffix("_TRAIN") if a.train_file else "BIDMC32HR"
        return f"{dataset}_{a.model}_h{a.nhid}_seed{a.seed}"

    def build_model(self):
        a, x = self.args, self.splits["train"][0]
        return lem.RNNModel(a.model, x.size(-1), a.nhid, 1, dt=a.dt, backend=a.backend)

    def train_batches(self, epoch):
        return lem.shuffled_batches(len(self.splits["train"][1]), self.args.batch, self.args.seed, epoch)

    def predict(self, model, split, idx):
        x, y, lengths = self.splits[split]
        idx = idx.to(self.device)
        return model(*padded_batch(x, lengths, idx)).squeeze(-1), y[idx]

    def loss(self, model, idx):
        return F.mse_loss(*self.predict(model, "train", idx))

    def evaluate(self, model, split):
        n = len(self.splits[split][1])
        sq_err = sum(F.mse_loss(*self.predict(model, split, idx), reduction="sum").item()
                     for idx in lem.batches_in_order(n, self.args.eval_batch))
        return {"rmse": (sq_err / n) ** 0.5}


if __name__ == "__main__":
    lem.run(HeartRate)
