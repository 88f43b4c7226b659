"""The task sMNIST, psMNIST and noisy CIFAR-10 share (docs/paper.md §3.6-3.8): a 10-class image dataset
read as a sequence, its last state y_T classified.

Each dataset is decoded once (lem/data/images.py) into uint8 tensors that stay on the training device;
a batch is an index tensor, and its pixel sequences (T, B, I) are built on the device when the
batch is used (`ImageTask.sequences`). There is no DataLoader and no per-item transform.
"""
from ..data.images import split_train_valid
from .cli import at_least
from .task import ClassificationTask


class ImageTask(ClassificationTask):
    """A subclass states `load(root)` (lem.images.load_mnist / load_cifar10, with `synthetic` the
    matching stand-in), `input_size`, `sequences(images)` (uint8 batch -> float (T, B, input_size)
    on the device) and its defaults."""

    output_size = 10
    valid_size = None            # the size of the validation part cut from the training set (docs/paper.md §3.6-3.8)

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--valid-size", type=at_least(1), default=cls.valid_size,
                            help="images of the training set held out for validation")

    def __init__(self, args, device):
        super().__init__(args, device)
        data = self.load(args.data_dir)
        images, labels = data["train"]
        train, valid = split_train_valid(len(images), args.valid_size, args.seed)
        self.keep_splits({"train": (images[train], labels[train]), "valid": (images[valid], labels[valid]),
                          "test": data["test"]})
