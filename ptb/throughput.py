"""Training tokens per second of ptb/train.py's model at a level's settings (paper's by default).

    python ptb/throughput.py --level word --steps 5
    python ptb/throughput.py --level char --steps 3 --device cuda

Times the training step (forward over one bptt × batch window with the carried state,
cross-entropy + L2 penalty, backward, gradient clipping, Adam) on random tokens of PTB's
vocabulary size (10000 words, 50 characters), after --warmup untimed steps; needs no data files.
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lem.harness import build_parser
from train import LanguageModel, l2_penalty, task_for

VOCAB = {"word": 10000, "char": 50}


def main(argv=None):
    timing = argparse.ArgumentParser(add_help=False)
    timing.add_argument("--steps", type=int, default=5, help="timed steps")
    timing.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    t, rest = timing.parse_known_args(argv)
    a = build_parser(task_for(rest)).parse_args(rest)
    device = torch.device(a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(a.seed)
    model = LanguageModel(VOCAB[a.level], a.emsize, a.nhid, a.dropout_in, a.dropout_out, a.dropout_state,
                          a.tie_weights).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=a.lr)
    tokens = torch.randint(VOCAB[a.level], (a.bptt + 1, a.batch), device=device)
    state, times = None, []
    for _ in range(t.warmup + t.steps):
        start = time.perf_counter()
        logits, state = model(tokens[:-1], state)
        state = tuple(s.detach() for s in state)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten()) + a.l2 * l2_penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), a.grad_norm)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_step = sum(times[t.warmup:]) / t.steps
    print(f"{a.level}: H {a.nhid}, batch {a.batch}, bptt {a.bptt} on {device} ({torch.get_num_threads()} threads): "
          f"{per_step:.3f} s/step, {a.batch * a.bptt / per_step:,.0f} training tokens/s over {t.steps} steps")


if __name__ == "__main__":
    main()
