"""Sequential MNIST (docs/paper.md §3.8): each image read pixel by pixel, row by row: 784 steps of 1 feature."""


def pixel_sequences(images):
    """uint8 images (B, 28, 28) -> float (784, B, 1) in [0, 1], time-first, in row-major pixel order."""
    return images.flatten(1).T.unsqueeze(-1).float().div_(255)
