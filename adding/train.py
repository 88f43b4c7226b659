"""Adding task (docs/paper.md §3.1). Paper: LEM converges to test MSE ~1e-4 ... 1e-5 at T = 2000/5000/10000.

    python adding/train.py                                  # T = 10000, the paper's run
    python adding/train.py --seq-length 2000
    python adding/train.py --seq-length 200 --max-iter 3000 # a few minutes on a laptop

A fresh training batch every iteration; every 100 iterations ("an epoch" in the logs) the test
MSE on 1000 held-out samples. The run ends after --max-iter iterations, or after --epochs such
evaluations if that comes first. The test samples are drawn once (from seed + 1) so every point
of the curve is measured on the same set; the reference drew 1000 new ones each time.

Tuning (python -m lem.tools.tune adding, docs/tuning.md) selects on this eval set, as the task has
no other: it is 1000 fresh samples like any training batch, and the tuned figure comes from the
--seeds re-runs, whose eval sets (from their own seed + 1) the study never saw; the tool refuses
--seeds that repeat the study's seed.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script (python adding/train.py): the checkout first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lem.train
from lem.train import at_least
from lem.train.task import activation_bytes
from adding.data import adding_batch

EVAL_EVERY = 100


class Adding(lem.train.Task):
    name = "adding"
    metric = "mse"
    higher_is_better = False
    paper = "1e-4 ... 1e-5"
    baseline = 0.167  # always predicting 1 (the mean of the target): its variance, 1/6
    defaults = dict(nhid=128, batch=50, lr=0.0026, dt=0.0242, seed=5544, epochs=None)
    epoch = f"{EVAL_EVERY} iterations; None: as many as --max-iter makes"
    eval_splits = ("test",)
    tune_split = "test"  # see the module docstring
    input_size, output_size = 2, 1

    search = dict(lr=(5e-4, 1e-2), batch=(25, 50, 100), dt=(0.005, 0.1))  # around the paper's; no clip (it has none)

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--seq-length", type=at_least(2), default=10000, help="T")
        parser.add_argument("--max-iter", type=at_least(1), default=30000, help="training iterations")
        parser.add_argument("--test-size", type=at_least(1), default=1000)

    @classmethod
    def memory_needs(cls, args):
        T, floats = args.seq_length, 2 * 4  # (T, B, 2) float32 inputs
        return {**super().memory_needs(args),
                "--seq-length x --test-size (the test set)": T * args.test_size * floats,
                "--seq-length x --batch (a training batch)": T * args.batch * floats,
                "--seq-length x --batch x --nhid (a training step's states)": activation_bytes(T, args.batch, args.nhid)}

    def __init__(self, args, device):
        super().__init__(args, device)
        self.test = adding_batch(args.seq_length, args.test_size, torch.Generator().manual_seed(args.seed + 1))

    def run_name(self):
        a = self.args
        return f"{a.model}_T{a.seq_length}_h{a.nhid}_seed{a.seed}"

    def num_epochs(self):
        epochs = -(-self.args.max_iter // EVAL_EVERY)
        return min(epochs, self.args.epochs) if self.args.epochs is not None else epochs

    def train_batches(self, epoch):
        first = epoch * EVAL_EVERY
        return [self.args.seed * 1_000_003 + i for i in range(first, min(first + EVAL_EVERY, self.args.max_iter))]

    def loss(self, model, batch_seed):
        x, y = adding_batch(self.args.seq_length, self.args.batch, torch.Generator().manual_seed(batch_seed))
        x, y = lem.train.share(x, dim=1), lem.train.share(y)  # under torchrun: this process's part of the batch
        return F.mse_loss(model(x.to(self.device)), y.to(self.device))

    def evaluate(self, model, split):
        x, y = self.test
        sq_err = 0.0
        chunk = self.eval_chunk(x.size(0))
        for xb, yb in zip(x.split(chunk, dim=1), y.split(chunk)):
            sq_err += F.mse_loss(model(xb.to(self.device)), yb.to(self.device), reduction="sum").item()
        return {"mse": sq_err / len(y)}


if __name__ == "__main__":
    lem.train.run(Adding)
