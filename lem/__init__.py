"""Long Expressive Memory (Rusch, Mishra, Erichson, Mahoney, ICLR 2022)."""
from .model import LEM, LEMCell, RNNModel, ShapeError, load_reference_state_dict, make_rnn
from .harness import Task, run, shuffled_batches, batches_in_order
from .distributed import share

__all__ = ["LEM", "LEMCell", "RNNModel", "ShapeError", "load_reference_state_dict", "make_rnn",
           "Task", "run", "shuffled_batches", "batches_in_order", "share"]
