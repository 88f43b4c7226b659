"""Noisy CIFAR-10 (docs/paper.md §3.6). Paper: LEM test accuracy 60.5 %.

    python noisy_cifar/train.py                  # the reference's fixed noise block
    python noisy_cifar/train.py --fresh-noise    # new noise for every sample (stricter)

Each image is 32 steps of 96 features (one row of the three channels) followed by 968 steps of
Gaussian noise, T = 1000. By default, as in the reference, one noise block drawn right after
seeding is appended to every image, in training and evaluation alike. --fresh-noise draws new
noise for every sample of every training batch; valid and test then get noise from a generator
seeded with --seed + 1 / + 2 at each evaluation, so every evaluation sees the same noisy set.
CIFAR-10 is downloaded by torchvision into <data>/cifar-10-batches-py; the 50000 training
images are split 48000 / 2000 into train / valid (random_split, generator seeded with --seed).
"""
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script (python noisy_cifar/train.py): the checkout first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lem.train
from lem.train.image_task import ImageTask
from lem.data.images import load_cifar10, synthetic_cifar10
from noisy_cifar.data import FEATURES, draw_noise_block, noisy_sequences


class NoisyCIFAR(ImageTask):
    name = "noisy_cifar"
    paper = 60.5
    defaults = dict(nhid=128, batch=100, lr=0.00322, dt=0.44, epochs=120, lr_decay_epoch=100, seed=5544)
    input_size = FEATURES
    valid_size = 2000
    load, synthetic = staticmethod(load_cifar10), staticmethod(synthetic_cifar10)

    @classmethod
    def add_arguments(cls, parser):
        super().add_arguments(parser)
        parser.add_argument("--fresh-noise", action="store_true",
                            help="new noise for every sample instead of the reference's one fixed block")

    def __init__(self, args, device):
        noise = draw_noise_block()  # first draw after seeding, as in the reference
        super().__init__(args, device)
        self.noise = None if args.fresh_noise else noise.to(device)

    def run_name(self):
        return super().run_name() + ("_fresh_noise" if self.args.fresh_noise else "")

    def sequences(self, images):
        return noisy_sequences(images, self.noise)

    def evaluate(self, model, split):
        if self.noise is not None:
            return super().evaluate(model, split)
        # fresh noise, but the same at every evaluation, and training's RNG left untouched
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.args.seed + 1 + self.eval_splits.index(split))
            return super().evaluate(model, split)


if __name__ == "__main__":
    lem.train.run(NoisyCIFAR)
