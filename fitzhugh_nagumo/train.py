"""FitzHugh-Nagumo: predict v one step ahead at every step (docs/paper.md §3.3). Paper: test L² 0.002.

    python fitzhugh_nagumo/train.py            # the paper's run, ~minutes on a laptop CPU

Trained on MSE; reported as sqrt(MSE) over the whole split (the reference reported its last
batch of 128 only).
"""
import sys
from pathlib import Path

import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script (python fitzhugh_nagumo/train.py): the checkout first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lem.train
from lem.train import at_least
from fitzhugh_nagumo.data import SPLIT_SIZES, load_splits



class FitzHughNagumo(lem.train.Task):
    name = "fitzhugh_nagumo"
    metric = "rmse"
    higher_is_better = False
    paper = {"lem": 0.002, "lstm": 0.012, "gru": 0.011}  # the paper's FitzHugh-Nagumo table (1.2e-2, 1.1e-2)
    defaults = dict(nhid=16, batch=32, lr=0.00904, dt=1.0, epochs=400, seed=1234)
    input_size, output_size, head = 1, 1, "every"

    search = dict(lr=(1e-3, 5e-2), batch=(16, 32, 64), dt=(0.1, 2.0))  # around the paper's; no clip (it has none)

    @staticmethod
    def add_arguments(parser):
        for split, n in SPLIT_SIZES.items():
            parser.add_argument(f"--n-{split}", type=at_least(1), default=n, help=f"{split} trajectories")

    def __init__(self, args, device):
        super().__init__(args, device)
        sizes = {"train": args.n_train, "valid": args.n_valid, "test": args.n_test}
        self.keep_splits(load_splits(Path(args.data_dir), args.seed, sizes))

    def train_batches(self, epoch):
        return lem.train.shuffled_batches(self.args.n_train, self.args.batch, self.args.seed, epoch)

    def loss(self, model, idx):
        x, y = self.splits["train"]
        idx = idx.to(self.device)
        return F.mse_loss(model(x[:, idx]), y[:, idx])

    def evaluate(self, model, split):
        x, y = self.splits[split]
        chunk = self.eval_chunk(x.size(0))  # one call per split at the defaults
        sq_err = sum(F.mse_loss(model(xb), yb, reduction="sum").item()
                     for xb, yb in zip(x.split(chunk, dim=1), y.split(chunk, dim=1)))
        return {"rmse": (sq_err / y.numel()) ** 0.5}


if __name__ == "__main__":
    lem.train.run(FitzHughNagumo)
