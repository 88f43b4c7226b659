"""The experiments of the checkout the tools run in, and the Task class each one's train.py trains.
Each experiment is a package of the checkout (smnist/__init__.py, smnist/data.py, smnist/train.py),
imported by name with the checkout first on sys.path."""
import importlib
import sys

from .. import checkout
from ..train import Task


def names():
    """The experiments of the checkout the current folder is in (NotACheckout outside one)."""
    return checkout.experiments(checkout.required_root())


def import_train(experiment):
    """The module <experiment>/train.py of the current checkout, imported as `<experiment>.train`."""
    root = checkout.required_root()
    if experiment not in checkout.experiments(root):
        raise ValueError(f"experiment must be one of {', '.join(checkout.experiments(root))}, got {experiment!r}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{experiment}.train")


def task_class(experiment, argv=()):
    """The Task class `python <experiment>/train.py ARGV` trains: the module's task_for(argv) where
    it has one (PTB: the class depends on --level), else the one Task subclass it defines."""
    module = import_train(experiment)
    if hasattr(module, "task_for"):
        return module.task_for(list(argv))
    (task,) = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, Task) and v.__module__ == module.__name__]
    return task
