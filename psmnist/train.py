"""Permuted sequential MNIST (docs/paper.md §3.7). Paper: LEM test accuracy 96.6 %.

    python psmnist/train.py

As sMNIST, with the pixels reordered by one permutation torch.randperm(784) drawn right after
seeding (so fixed by --seed), saved as permutation.json in the run folder; psmnist/data.py's
load_permutation reads it back to re-evaluate a run's checkpoint.
"""
import sys
from pathlib import Path
if __package__ in (None, ""):  # run as a script (python psmnist/train.py): the checkout first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lem.train
from lem.train.image_task import ImageTask
from lem.data.images import load_mnist, synthetic_mnist
from psmnist.data import draw_permutation, permuted_sequences, save_permutation


class PermutedMNIST(ImageTask):
    name = "psmnist"
    paper = 96.6
    defaults = dict(nhid=128, batch=128, lr=0.0073, dt=0.31, grad_norm=1.1, epochs=120, lr_decay_epoch=100,
                    seed=5544)
    input_size = 1
    valid_size = 3000
    load, synthetic = staticmethod(load_mnist), staticmethod(synthetic_mnist)

    def __init__(self, args, device):
        self.permutation = draw_permutation()  # first draw after seeding, as in the reference
        super().__init__(args, device)
        self.permutation = self.permutation.to(device)

    def start(self, run_dir):
        save_permutation(run_dir / "permutation.json", self.permutation)

    def sequences(self, images):
        return permuted_sequences(images, self.permutation)


if __name__ == "__main__":
    lem.train.run(PermutedMNIST)
