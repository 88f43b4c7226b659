"""FitzHugh-Nagumo: predict v one step ahead at every step (SPEC §3.3). Paper: test L² 0.002.

    python fitzhugh_nagumo/train.py            # the paper's run, ~minutes on a laptop CPU

Trained on MSE; reported as sqrt(MSE) over the whole split (the reference reported its last
batch of 128 only).
"""
from pathlib import Path

import torch
import torch.nn.functional as F

import lem
from lem.harness import at_least
from data import SPLIT_SIZES, load_splits


EVAL_BYTES = 256 * 2**20  # evaluation: as many series per call as keep the layer's outputs under this


class FitzHughNagumo(lem.Task):
    name = "fitzhugh_nagumo"
    metric = "rmse"
    higher_is_better = False
    paper = {"lem": 0.002, "lstm": 0.012, "gru": 0.011}  # the paper's FitzHugh-Nagumo table (1.2e-2, 1.1e-2)
    defaults = dict(nhid=16, batch=32, lr=0.00904, dt=1.0, epochs=400, seed=1234)

    @staticmethod
    def add_arguments(parser):
        for split, n in SPLIT_SIZES.items():
            parser.add_argument(f"--n-{split}", type=at_least(1), default=n, help=f"{split} trajectories")

    def __init__(self, args, device):
        super().__init__(args, device)
        sizes = {"train": args.n_train, "valid": args.n_valid, "test": args.n_test}
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in load_splits(Path(args.data_dir), args.seed, sizes).items()}

    def build_model(self):
        a = self.args
        return lem.RNNModel(a.model, 1, a.nhid, 1, dt=a.dt, head="every", backend=a.backend)

    def train_batches(self, epoch):
        return lem.shuffled_batches(self.args.n_train, self.args.batch, self.args.seed, epoch)

    def loss(self, model, idx):
        x, y = self.splits["train"]
        idx = idx.to(self.device)
        return F.mse_loss(model(x[:, idx]), y[:, idx])

    def evaluate(self, model, split):
        # one call per split at the defaults (its outputs: 1000 x 1024 x 16 floats, 66 MB): with two
        # threads on a shared CPU, 4 calls of 256 test series took twice as long as one of 1024
        x, y = self.splits[split]
        chunk = max(1, EVAL_BYTES // (x.size(0) * self.args.nhid * x.element_size()))
        sq_err = sum(F.mse_loss(model(xb), yb, reduction="sum").item()
                     for xb, yb in zip(x.split(chunk, dim=1), y.split(chunk, dim=1)))
        return {"rmse": (sq_err / y.numel()) ** 0.5}


if __name__ == "__main__":
    lem.run(FitzHughNagumo)
