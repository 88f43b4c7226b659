"""Noisy CIFAR-10 (docs/paper.md §3.6): an image as its 32 rows, then 968 steps of Gaussian noise (T = 1000)."""
import torch

ROWS, FEATURES, T = 32, 96, 1000
NOISE_STEPS = T - ROWS


def draw_noise_block():
    """The reference's noise: one (968, 96) standard-normal block, drawn from the global RNG right
    after seeding, appended to every image."""
    return torch.randn(NOISE_STEPS, FEATURES)


def row_sequences(images):
    """uint8 images (B, 3, 32, 32) -> float (32, B, 96) in [0, 1]: step r is row r of the
    red, green and blue channels concatenated (the reference's permute(0, 2, 1, 3))."""
    return images.permute(2, 0, 1, 3).reshape(ROWS, len(images), FEATURES).float().div_(255)


def noisy_sequences(images, noise=None):
    """(1000, B, 96): the 32 image rows, then `noise` (968, 96) for every image, or fresh
    N(0, 1) noise per image when noise is None."""
    rows = row_sequences(images)
    if noise is None:
        tail = torch.randn(NOISE_STEPS, len(images), FEATURES, device=images.device)
    else:
        tail = noise.unsqueeze(1).expand(NOISE_STEPS, len(images), FEATURES)
    return torch.cat((rows, tail))
