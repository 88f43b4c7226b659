"""The harness calls Task.after_step after every optimizer step and Task.after_evaluation after
every evaluation, before the checkpoint (PTB's weight averaging is built on them)."""
import torch
import torch.nn as nn

import lem.train
from helpers import read_run


class Counting(lem.train.Task):
    name, metric = "counting", "mse"
    defaults = dict(epochs=3)

    def __init__(self, args, device):
        super().__init__(args, device)
        self.calls = []

    def build_model(self):
        return nn.Linear(1, 1)

    def train_batches(self, epoch):
        return [0, 1]

    def loss(self, model, batch):
        return model(torch.ones(1, 1)).pow(2).sum()

    def after_step(self, model):
        self.calls.append(("step", model.weight.item()))

    def after_evaluation(self, epoch, metrics):
        self.calls.append(("evaluation", epoch, metrics["valid"]["mse"]))

    def evaluate(self, model, split):
        return {"mse": model(torch.ones(1, 1)).pow(2).item()}

    def state_dict(self):
        Counting.last_calls = list(self.calls)
        return {}


def test_hooks_are_called_in_order(tmp_path):
    summary = lem.train.run(Counting, ["--out-dir", str(tmp_path), "--data-dir", str(tmp_path), "--device", "cpu"])[0]
    calls = Counting.last_calls
    assert [c[0] for c in calls] == ["step", "step", "evaluation"] * 3
    assert [c[1] for c in calls if c[0] == "evaluation"] == [1, 2, 3]
    assert calls[0][1] != calls[1][1]  # after_step sees the weights after that step
    assert [c[2] for c in calls if c[0] == "evaluation"] == [r["valid"]["mse"] for r in read_run(summary_dir(tmp_path))[2]]


def summary_dir(tmp_path):
    return next(p.parent for p in tmp_path.glob("*/summary.json"))


def test_the_default_hooks_do_nothing():
    task = lem.train.Task(None, torch.device("cpu"))
    assert task.after_step(nn.Linear(1, 1)) is None and task.after_evaluation(1, {}) is None
