"""Sequential MNIST (docs/paper.md §3.8). Paper: LEM test accuracy 99.5 %.

    python smnist/train.py               # H = 128, the reference's default
    python smnist/train.py --nhid 256    # the paper's 256-unit run

MNIST is downloaded by torchvision into <data>/MNIST/raw (see lem/data/images.py; the task sMNIST,
psMNIST and noisy CIFAR share: lem/train/image_task.py). The 60000 training images are split
57000 / 3000 into train / valid (random_split, generator seeded with --seed); the test set is
MNIST's 10000. Epoch time here: python -m lem.tools.bench epoch smnist --synthetic (docs/images.md).
"""
import sys
from pathlib import Path
if __package__ in (None, ""):  # run as a script (python smnist/train.py): the checkout first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lem.train
from lem.train.image_task import ImageTask
from lem.data.images import load_mnist, synthetic_mnist
from smnist.data import pixel_sequences


class SequentialMNIST(ImageTask):
    name = "smnist"
    paper = 99.5
    defaults = dict(nhid=128, batch=128, lr=0.0018, dt=0.21, grad_norm=1.0, epochs=120, lr_decay_epoch=100,
                    seed=5544)
    input_size = 1
    valid_size = 3000
    load, synthetic = staticmethod(load_mnist), staticmethod(synthetic_mnist)

    def sequences(self, images):
        return pixel_sequences(images)


if __name__ == "__main__":
    lem.train.run(SequentialMNIST)
