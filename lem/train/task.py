"""What an experiment states: its data, model, loss, metric and the paper's defaults (docs/paper.md §3).

An experiment subclasses `Task` in its train.py and calls `lem.train.run(MyTask)`. Training is cut
into epochs; each epoch is a list of cheap batch keys (index tensors, seeds) fixed by (seed, epoch)
alone, so a resumed run replays exactly the batches it would have seen.
"""
import torch
import torch.nn.functional as F

from ..nn import RNNModel

EVAL_BYTES = 256 * 2**20  # evaluation: as many series per call as keep the layer's outputs under this
SEARCHABLE = ("lr", "batch", "dt", "grad_norm")  # what Task.search_space draws (Task.search names their ranges)
GATE_BLOCKS = {"lem": 4, "lstm": 4, "gru": 3}  # H-blocks of input and recurrent weights (LEM: docs/paper.md §1)

class Task:
    """What an experiment states. Subclass it in <experiment>/train.py."""

    name = None               # the experiment folder, e.g. "fitzhugh_nagumo"
    metric = None             # key of evaluate()'s dict used for model selection and reports
    higher_is_better = False
    paper = None              # the paper's figure (docs/paper.md §2): LEM's, or {model: figure} where the paper
                              # reports its baselines too
    baseline = None           # the metric of a trivial predictor, drawn beside the curves (adding: 0.167)
    defaults = {}             # paper hyper-parameters of the common flags (docs/paper.md §3)
    eval_splits = ("valid", "test")
    models = ("lem", "lstm", "gru")   # what --model offers
    epoch = "one pass over the training set"  # what --epochs counts (the unit of the logs and of lr decay)
    load = None               # the function that reads the data, when __init__ reads files through self.load;
    synthetic = None          # then a stand-in of the same signature and real shapes, random values
                              # (python -m lem.tools.bench epoch --synthetic times a task without its files)
    input_size = None         # the model's features per step (set in __init__ when the data decides)
    output_size = None        # the head's outputs
    head = "last"             # RNNModel's head: 'last' (y_T) or 'every' (y_n at every step)
    tune_split = "valid"      # the split python -m lem.tools.tune selects on (docs/tuning.md); never
                              # "test" unless the experiment's docstring says why that is sound
    search = {}               # python -m lem.tools.tune's ranges where search_space's defaults do not fit:
                              # lr, dt, grad_norm: (low, high) log-uniform; batch: the sizes to choose from

    @staticmethod
    def add_arguments(parser):
        """Flags only this experiment has."""

    @classmethod
    def memory_needs(cls, args):
        """What this run's data and first training step take at the least, in bytes, known from the
        flags before anything is allocated: {what, naming its flags: bytes}. The harness stops a run
        that needs more than its device has free. Here: the recurrent layer's weights, their
        gradients and Adam's two moments; an experiment adds its data and a step's states."""
        blocks = GATE_BLOCKS.get(args.model)
        if blocks is None:
            return {}
        weights = blocks * args.nhid * ((cls.input_size or 1) + args.nhid + 2)  # W_in, W_hh and two biases
        return {"--nhid (the recurrent weights, their gradients and Adam's two moments)": 4 * 4 * weights}

    @classmethod
    def search_space(cls, trial, model):
        """What python -m lem.tools.tune searches for `model`: {flag dest: value}, each value drawn
        with trial.suggest_* (docs/tuning.md), in the ranges of `search`, else: lr log-uniform within
        5x of the paper's; batch half, same or double the paper's; for LEM, Δt log-uniform from a
        tenth to twice the paper's; where the paper clips, the clip log-uniform within 5x of its value."""
        from .cli import COMMON_DEFAULTS
        d = {**COMMON_DEFAULTS, **cls.defaults}
        ranges = {"lr": (d["lr"] / 5, d["lr"] * 5), "batch": sorted({max(1, d["batch"] // 2), d["batch"], 2 * d["batch"]}),
                  "dt": (d["dt"] / 10, d["dt"] * 2),
                  "grad_norm": (d["grad_norm"] / 5, d["grad_norm"] * 5) if d["grad_norm"] else None, **cls.search}
        space = {"lr": trial.suggest_float("lr", *ranges["lr"], log=True),
                 "batch": trial.suggest_categorical("batch", list(ranges["batch"]))}
        if model == "lem":
            space["dt"] = trial.suggest_float("dt", *ranges["dt"], log=True)
        if ranges["grad_norm"]:
            space["grad_norm"] = trial.suggest_float("grad_norm", *ranges["grad_norm"], log=True)
        return space

    def __init__(self, args, device):
        """Read the data (a DataError says what is missing or corrupt). args: the parsed flags."""
        self.args, self.device = args, device

    def run_name(self):
        a = self.args
        return f"{a.model}_h{a.nhid}_seed{a.seed}"

    def num_epochs(self):
        return self.args.epochs

    def layer_options(self):
        """What every LEM layer of the model takes from the flags: Δt and the backend."""
        return {"dt": self.args.dt, "backend": self.args.backend}

    def model_options(self):
        """RNNModel's further arguments for this experiment (e.g. input_dropout)."""
        return {}

    def build_model(self):
        """The recurrent model --model names with --nhid units and this task's sizes and head; an
        experiment with another model (PTB) builds it with layer_options()."""
        a = self.args
        return RNNModel(a.model, self.input_size, a.nhid, self.output_size, head=self.head,
                        **self.layer_options(), **self.model_options())

    def eval_chunk(self, steps):
        """Series per evaluation call: as many as keep the recurrent layer's outputs (steps x series x
        nhid float32) under EVAL_BYTES: few large calls, which run faster than many small ones
        (docs/kernels.md), in bounded memory."""
        return max(1, EVAL_BYTES // (steps * self.args.nhid * 4))

    def keep_splits(self, splits):
        """Keep the data as self.splits = {split: (inputs, targets, ...)} on the training device."""
        self.splits = {k: tuple(t.to(self.device) for t in v) for k, v in splits.items()}

    def train_batches(self, epoch):
        """The keys of this epoch's batches, in order; loss() turns one into a loss. By default:
        shuffled index batches of --batch over the targets of self.splits["train"]."""
        return shuffled_batches(len(self.splits["train"][1]), self.args.batch, self.args.seed, epoch)

    def loss(self, model, batch):
        """The mean loss over one batch. Under torchrun an index batch arrives as this process's
        share; a batch drawn inside loss() (from a seed) should keep its share with lem.share."""
        raise NotImplementedError

    def evaluate(self, model, split):
        """A dict of metrics on one split; must hold self.metric."""
        raise NotImplementedError

    def after_step(self, model):
        """Called after every optimizer step (e.g. to update a weight average)."""

    def after_evaluation(self, epoch, metrics):
        """Called after the evaluation that closes epoch `epoch` (1-based), before the checkpoint.
        May return a status (e.g. "pruned") that ends the run once this epoch is saved and logged."""

    def state_dict(self):
        """Task state a checkpoint must keep beyond model, optimizer and RNGs."""
        return {}

    def load_state_dict(self, state):
        pass

    def start(self, run_dir):
        """Called with the run folder before training (and on --resume): files a run needs
        beside its logs go there, e.g. psMNIST's permutation."""


class ClassificationTask(Task):
    """A task whose splits are (samples, labels) with one class per sample, kept on the device: a
    batch of samples becomes the model's input (T, B, ·) by `sequences(samples)`, its last state is
    classified; trained on cross-entropy, selected on accuracy (%), the mean loss logged beside it.
    The image experiments (image_task.py) and Google12 state their data and `sequences`."""

    metric = "accuracy"
    higher_is_better = True

    def sequences(self, samples):
        raise NotImplementedError

    def loss(self, model, idx):
        samples, labels = self.splits["train"]
        idx = idx.to(self.device)
        return F.cross_entropy(model(self.sequences(samples[idx])), labels[idx])

    def evaluate(self, model, split):
        samples, labels = self.splits[split]
        correct, loss = 0, 0.0
        chunk = self.eval_chunk(self.sequences(samples[:1]).size(0))
        for x, y in zip(samples.split(chunk), labels.split(chunk)):
            logits = model(self.sequences(x))
            correct += (logits.argmax(-1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
        return {"accuracy": 100.0 * correct / len(labels), "loss": loss / len(labels)}


def activation_bytes(steps, batch, nhid):
    """The least a training step through a recurrent layer keeps for its backward: its states y and
    z (LEM; h and c of an LSTM) at every step, float32."""
    return 2 * steps * batch * nhid * 4


def shuffled_batches(n, batch_size, seed, epoch):
    """Index batches of a random permutation of range(n), fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(torch.randperm(n, generator=generator).split(batch_size))


def batches_in_order(n, batch_size):
    return list(torch.arange(n).split(batch_size))
