"""Permuted sequential MNIST (docs/paper.md §3.7): the 784 pixels in one fixed random order."""
import json

import torch

from lem.atomic import write_json
from lem.data import DataError

PIXELS = 28 * 28


def draw_permutation():
    """The reference's permutation: torch.randperm(784) from the global RNG right after seeding."""
    return torch.randperm(PIXELS)


def permuted_sequences(images, permutation):
    """uint8 images (B, 28, 28) -> float (784, B, 1) in [0, 1]: step n is pixel permutation[n]."""
    return images.flatten(1)[:, permutation].T.unsqueeze(-1).float().div_(255)


def save_permutation(path, permutation):
    write_json(path, permutation.tolist())


def load_permutation(path):
    """A permutation saved by save_permutation (a run folder's permutation.json)."""
    permutation = torch.tensor(json.loads(open(path).read()))
    if sorted(permutation.tolist()) != list(range(PIXELS)):
        raise DataError(f"{path} must hold a permutation of 0..{PIXELS - 1}")
    return permutation
