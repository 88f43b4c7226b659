"""PTB language modelling, word or character level (docs/paper.md §3.9). Paper: test perplexity 72.8
(word), test bits per character 1.25 (char), one LEM layer each.

    python ptb/train.py --level word
    python ptb/train.py --level char
    python ptb/train.py --level word --max-steps 2000     # a short run
    python -m lem.tools.bench epoch ptb --level char --synthetic --no-eval   # training tokens/s here

embedding → dropout → LEM (Δt = --dt, 1 in the paper; z-gate bias +1; variational dropout on y)
→ dropout → decoder (tied to the embedding at word level). The training corpus is read as `batch`
parallel streams in windows of `bptt` tokens, the state carried (detached) from one window to the
next. One "turn" (a harness epoch in the logs, what --epochs counts) is `eval_every` = 200 steps;
after each turn the whole validation and test splits are evaluated deterministically.

Weight averaging (docs/paper.md §3.9): once validation has not improved for `avg_patience` turns, or at
turn `avg_latest` at the latest, the run switches to the arithmetic mean of the weights after
every later step (torch.optim.swa_utils.AveragedModel) and evaluates with it. Our stopping rule
(the reference's could not be checked): the run ends when the averaged model's validation has
not improved for `avg_patience` turns, or after --epochs turns, or after --max-steps steps.
"""
import sys
import argparse
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

if __package__ in (None, ""):  # run as a script (python ptb/train.py): the checkout first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lem.train
from lem.train import at_least, non_negative, probability
from ptb.data import batchify, eval_streams, load_corpus, num_windows, synthetic_corpus, window


class LanguageModel(nn.Module):
    """embedding → input dropout → LEM → output dropout → decoder (docs/paper.md §3.9)."""

    def __init__(self, vocab_size, emsize, nhid, dropout_in, dropout_out, dropout_state, tie_weights, **layer_options):
        super().__init__()
        if tie_weights and emsize != nhid:
            raise ValueError(f"tied embedding and decoder need --emsize == --nhid, got {emsize} and {nhid}")
        self.embedding = nn.Embedding(vocab_size, emsize)
        self.input_dropout = nn.Dropout(dropout_in)
        self.rnn = lem.LEM(emsize, nhid, state_dropout=dropout_state, **layer_options)  # dt, backend
        self.output_dropout = nn.Dropout(dropout_out)
        self.decoder = nn.Linear(nhid, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        H = nhid
        with torch.no_grad():  # z-gate bias b1 = inp2hid.bias[H:2H] + hid2hid.bias[H:2H] starts at +1
            self.rnn.inp2hid.bias[H:2 * H] = 1.0
            self.rnn.hid2hid.bias[H:2 * H] = 0.0

    def forward(self, tokens, state=None):
        """tokens (T, B) → logits (T, B, vocab), final state (y_n, z_n), each (1, B, nhid)."""
        ys, state = self.rnn(self.input_dropout(self.embedding(tokens)), state)
        return self.decoder(self.output_dropout(ys)), state


def l2_penalty(model):
    """½ Σ θ² over every parameter, once each (tied weights count once), as tf.nn.l2_loss."""
    return sum(p.pow(2).sum() for p in model.parameters()) / 2


class PTB(lem.train.Task):
    name = "ptb"
    higher_is_better = False
    models = ("lem",)
    epoch = "a turn of --eval-every steps"
    load, synthetic = staticmethod(load_corpus), staticmethod(synthetic_corpus)
    level = None
    level_defaults = {}

    @classmethod
    def add_arguments(cls, parser):
        d = cls.level_defaults
        parser.add_argument("--level", choices=["word", "char"], default=cls.level)
        parser.add_argument("--emsize", type=at_least(1), default=d["emsize"], help="embedding size")
        parser.add_argument("--bptt", type=at_least(1), default=d["bptt"], help="window length of truncated BPTT")
        parser.add_argument("--dropout-in", type=probability, default=d["dropout_in"], help="dropout on the embedding")
        parser.add_argument("--dropout-out", type=probability, default=d["dropout_out"], help="dropout on the LEM output")
        parser.add_argument("--dropout-state", type=probability, default=d["dropout_state"],
                            help="variational dropout on the recurrent state y (one mask per window)")
        parser.add_argument("--l2", type=non_negative, default=d["l2"], help="L2 penalty: loss += l2 · ½ Σ θ²")
        parser.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=d["tie_weights"],
                            help="decoder weight = embedding weight")
        parser.add_argument("--eval-every", type=at_least(1), default=200, help="steps per turn (validation after each)")
        parser.add_argument("--avg-patience", type=at_least(1), default=d["avg_patience"],
                            help="turns without validation improvement before averaging starts (and before stopping once averaging)")
        parser.add_argument("--avg-latest", type=at_least(1), default=d["avg_latest"], help="start averaging at this turn at the latest")
        parser.add_argument("--max-steps", type=at_least(1), default=None, help="stop after this many steps (short runs)")
        parser.add_argument("--eval-batch", type=at_least(1), default=10, help="parallel streams when evaluating")
        parser.add_argument("--data-url", default=None,
                            help="base URL of the PTB files (word) or of simple-examples.tgz (char); default: see ptb/data.py")

    def __init__(self, args, device):
        super().__init__(args, device)
        self.vocab, ids = self.load(args.level, Path(args.data_dir) / "ptb", args.data_url)
        self.train_streams = batchify(ids["train"], args.batch).to(device)
        self.eval_data = {split: tuple(t.to(device) for t in eval_streams(ids[split], args.eval_batch))
                          for split in ("valid", "test")}
        self.n_windows = num_windows(self.train_streams, args.bptt)
        self.carry = None                         # (y_n, z_n) after the last training window, each (1, batch, nhid)
        self.averaged = None                      # AveragedModel, made in build_model
        self.averaging_from = None                # turn after which every step is averaged
        self.best, self.best_turn, self.stop_turn = None, 0, None

    def run_name(self):
        a = self.args
        return f"lem_{a.level}_h{a.nhid}_seed{a.seed}"

    def num_epochs(self):
        turns = self.args.epochs
        if self.args.max_steps is not None:
            turns = min(turns, -(-self.args.max_steps // self.args.eval_every))
        return min(turns, self.stop_turn) if self.stop_turn is not None else turns

    def build_model(self):
        a = self.args
        model = LanguageModel(len(self.vocab), a.emsize, a.nhid, a.dropout_in, a.dropout_out, a.dropout_state,
                              a.tie_weights, **self.layer_options()).to(self.device)
        self.averaged = AveragedModel(model)  # the arithmetic mean (its default), filled once averaging starts
        return model

    def train_batches(self, turn):
        """Global step numbers: step s reads window s mod n_windows of the training streams."""
        last = (turn + 1) * self.args.eval_every
        if self.args.max_steps is not None:
            last = min(last, self.args.max_steps)
        return list(range(turn * self.args.eval_every, last))

    def loss(self, model, step):
        i = step % self.n_windows
        if i == 0:
            self.carry = None  # each pass over the training corpus starts from the zero state
        x, y = window(self.train_streams, i, self.args.bptt)
        logits, state = model(x, self.carry)
        self.carry = tuple(s.detach() for s in state)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()) + self.args.l2 * l2_penalty(model)

    def after_step(self, model):
        if self.averaging_from is not None:
            self.averaged.update_parameters(model)

    def evaluation_model(self, model):
        return self.averaged.module.eval() if self.averaging_from is not None else model

    def evaluate(self, model, split):
        net = self.evaluation_model(model)
        inputs, targets = self.eval_data[split]
        total, state = 0.0, None
        for x, y in zip(inputs.split(self.args.bptt), targets.split(self.args.bptt)):
            logits, state = net(x, state)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        nll = total / (targets != -100).sum().item()
        return {**self.metrics(nll), "nll": nll, "averaged": self.averaging_from is not None}

    def after_evaluation(self, turn, metrics):
        value = metrics["valid"][self.metric]
        if self.best is None or value < self.best:
            self.best, self.best_turn = value, turn
        stalled = turn - self.best_turn >= self.args.avg_patience
        if self.averaging_from is None and (stalled or turn >= self.args.avg_latest):
            self.averaging_from = turn
            self.best, self.best_turn = None, turn  # the averaged phase gets its own patience
        elif self.averaging_from is not None and stalled:
            self.stop_turn = turn

    def state_dict(self):
        return {"carry": self.carry, "averaged": self.averaged.state_dict(), "averaging_from": self.averaging_from,
                "best": self.best, "best_turn": self.best_turn, "stop_turn": self.stop_turn}

    def load_state_dict(self, state):
        self.averaged.load_state_dict(state["averaged"])
        self.carry, self.averaging_from = state["carry"], state["averaging_from"]
        self.best, self.best_turn, self.stop_turn = state["best"], state["best_turn"], state["stop_turn"]


class PTBWord(PTB):
    level, metric, paper = "word", "ppl", 72.8
    defaults = dict(nhid=256, batch=64, lr=6.84e-4, grad_norm=4.0, dt=1.0, epochs=1600)  # epochs: 2 x avg_latest
    level_defaults = dict(emsize=256, bptt=70, dropout_in=0.4248, dropout_out=0.4568, dropout_state=0.1963,
                          l2=3.31e-4, tie_weights=True, avg_patience=50, avg_latest=800)

    @staticmethod
    def metrics(nll):
        return {"ppl": math.exp(nll)}


class PTBChar(PTB):
    level, metric, paper = "char", "bpc", 1.25
    defaults = dict(nhid=1024, batch=128, lr=6.58e-4, grad_norm=1.0, dt=1.0, epochs=800)
    level_defaults = dict(emsize=200, bptt=150, dropout_in=0.0474, dropout_out=0.1908, dropout_state=0.1855,
                          l2=2.63e-4, tie_weights=False, avg_patience=25, avg_latest=400)

    @staticmethod
    def metrics(nll):
        return {"bpc": nll / math.log(2)}


LEVELS = {"word": PTBWord, "char": PTBChar}


def task_for(argv=None):
    """The Task class of --level (its defaults differ), read before the full parse."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--level", choices=list(LEVELS), default="word")
    return LEVELS[pre.parse_known_args(argv)[0].level]


if __name__ == "__main__":
    lem.train.run(task_for())
