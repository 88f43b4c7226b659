"""The task EigenWorms and heart-rate prediction share (docs/paper.md §3.2, §3.5): a set of
variable-length multivariate series, zero-padded and time-first on the training device, one
target per series read from its state at its own last step.

A batch is an index tensor; it is cut to its longest series (lem/data/series.py), so no step runs
on padding only, and the layer runs each series for its own length.
"""
from ..data.series import padded_batch
from .task import Task, batches_in_order


class SeriesTask(Task):
    """A subclass states `read_splits()` -> {split: (x (T, N, C), targets (N,), lengths (N,))}, its
    output_size, loss and metric; input_size comes from the data."""

    def read_splits(self):
        raise NotImplementedError

    def __init__(self, args, device):
        super().__init__(args, device)
        self.keep_splits(self.read_splits())
        self.input_size = self.splits["train"][0].size(-1)

    def outputs(self, model, split, idx):
        """The model's outputs on series idx of a split, and their targets."""
        x, y, lengths = self.splits[split]
        idx = idx.to(self.device)
        return model(*padded_batch(x, lengths, idx)), y[idx]

    def eval_batches(self, split):
        """Index batches covering a split, sized by Task.eval_chunk."""
        x, y, _ = self.splits[split]
        return batches_in_order(len(y), self.eval_chunk(x.size(0)))
