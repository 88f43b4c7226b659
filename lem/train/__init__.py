"""The training harness: an experiment subclasses Task and calls run(MyTask) (lem/train/loop.py)."""
from .cli import at_least, non_negative, positive, probability
from .distributed import share
from .loop import run
from .task import ClassificationTask, Task, batches_in_order, shuffled_batches

__all__ = ["Task", "ClassificationTask", "run", "shuffled_batches", "batches_in_order", "share", "at_least", "positive", "non_negative", "probability"]
