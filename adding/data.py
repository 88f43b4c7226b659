"""Adding problem (docs/paper.md §3.1): sum the two marked values of a long random sequence."""
import torch


def adding_batch(seq_length, batch_size, generator=None):
    """x: (T, B, 2) with channel 0 ~ U(0, 1) and channel 1 the markers, exactly one 1 in
    [0, T/2) and one in [T/2, T); y: (B, 1), the sum of the two marked values."""
    half = seq_length // 2
    values = torch.rand(seq_length, batch_size, generator=generator)
    first = torch.randint(0, half, (batch_size,), generator=generator)
    second = torch.randint(half, seq_length, (batch_size,), generator=generator)
    markers = torch.zeros(seq_length, batch_size)
    columns = torch.arange(batch_size)
    markers[first, columns] = 1.0
    markers[second, columns] = 1.0
    x = torch.stack((values, markers), dim=-1)
    y = (values * markers).sum(dim=0).unsqueeze(-1)
    return x, y
