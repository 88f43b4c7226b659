"""The LEM layer (SPEC §1) and the small models every experiment is built from.

    Δt_n  = Δt · σ(W1 y_{n-1} + V1 u_n + b1)        gate of z
    Δt̄_n  = Δt · σ(W2 y_{n-1} + V2 u_n + b2)        gate of y
    z_n   = (1 − Δt_n) ⊙ z_{n-1} + Δt_n ⊙ tanh(Wz y_{n-1} + Vz u_n + bz)
    y_n   = (1 − Δt̄_n) ⊙ y_{n-1} + Δt̄_n ⊙ tanh(Wy z_n + Vy u_n + by)

Parameters keep the reference code's layout so its checkpoints load unchanged:
inp2hid = Linear(I, 4H) with rows [V2, V1, Vy, Vz], hid2hid = Linear(H, 3H) with rows
[W2, W1, Wz], transform_z = Linear(H, H) = Wy.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels


def lem_step(u_proj, y, z, hid2hid, transform_z, dt, y_mask=None):
    """One LEM step. u_proj = inp2hid(u_n), already computed for all steps at once.
    y_mask: optional state-dropout mask on y_{n-1} where it enters the recurrent weights."""
    u_gate_y, u_gate_z, u_cand_y, u_cand_z = u_proj.chunk(4, -1)
    h_gate_y, h_gate_z, h_cand_z = hid2hid(y if y_mask is None else y * y_mask).chunk(3, -1)
    dt_y = dt * torch.sigmoid(u_gate_y + h_gate_y)
    dt_z = dt * torch.sigmoid(u_gate_z + h_gate_z)
    z = (1.0 - dt_z) * z + dt_z * torch.tanh(u_cand_z + h_cand_z)
    y = (1.0 - dt_y) * y + dt_y * torch.tanh(transform_z(z) + u_cand_y)  # uses z_n, not z_{n-1}
    return y, z


class _LEMParameters(nn.Module):
    """The three linears of SPEC §1, shared by LEMCell (one step) and LEM (a sequence)."""

    def __init__(self, input_size, hidden_size, dt=1.0):
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"input_size and hidden_size must be positive, got {input_size}, {hidden_size}")
        if not dt > 0:
            raise ValueError(f"dt must be > 0, got {dt}")
        self.input_size, self.hidden_size, self.dt = input_size, hidden_size, float(dt)
        self.inp2hid = nn.Linear(input_size, 4 * hidden_size)
        self.hid2hid = nn.Linear(hidden_size, 3 * hidden_size)
        self.transform_z = nn.Linear(hidden_size, hidden_size)
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}, dt={self.dt:g}"

    def _initial_state(self, state, batch, like):
        H = self.hidden_size
        if state is None:
            zeros = like.new_zeros(batch, H)
            return zeros, zeros
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise ValueError("state must be a tuple (y0, z0)")
        y0, z0 = state
        for name, s in (("y0", y0), ("z0", z0)):
            if tuple(s.shape) != (batch, H):
                raise ValueError(f"{name} must have shape (batch, hidden_size) = ({batch}, {H}), got {tuple(s.shape)}")
        return y0, z0

    def _check_features(self, x):
        if x.size(-1) != self.input_size:
            raise ValueError(f"expected input_size = {self.input_size} features in the last dimension, got {x.size(-1)}")


class LEMCell(_LEMParameters):
    """One LEM step: (y_n, z_n) = cell(u_n, (y_{n-1}, z_{n-1})), u_n of shape (B, input_size)."""

    def forward(self, x, state=None):
        if x.dim() != 2:
            raise ValueError(f"LEMCell expects input of shape (batch, input_size), got {x.dim()} dimensions {tuple(x.shape)}")
        self._check_features(x)
        y, z = self._initial_state(state, x.size(0), x)
        return lem_step(self.inp2hid(x), y, z, self.hid2hid, self.transform_z, self.dt)


class LEM(_LEMParameters):
    """A LEM layer with the feel of nn.LSTM.

    ys, (y_T, z_T) = LEM(input_size, hidden_size, dt)(x, state=None)
    x: (T, B, input_size), or (B, T, input_size) with batch_first=True; ys has the same layout
    with hidden_size features; state is an optional (y0, z0), each (B, hidden_size).

    state_dropout > 0 (PTB, SPEC §3.9): in training, variational dropout on the recurrent state:
    one mask per call (a sequence window), multiplying y_{n-1} where it enters hid2hid at every
    step; the leaky carry (1 − Δt̄_n) ⊙ y_{n-1} and the outputs are not masked.

    backend: how the time loop runs (lem/kernels, docs/kernels.md): 'reference' (the loop below),
    'cpp' (fused CPU), 'triton' (fused GPU, the tier that fits; or a tier by name: 'onchip',
    'stepwise'), or 'auto' (the fused one for the tensors' device, 'reference' with a warning if it
    cannot be built or launched). Every backend honours state and state_dropout. Under torch.autocast
    the outputs come in the autocast dtype, as nn.LSTM's do.
    """

    def __init__(self, input_size, hidden_size, dt=1.0, batch_first=False, state_dropout=0.0, backend="auto"):
        super().__init__(input_size, hidden_size, dt)
        if not 0.0 <= state_dropout < 1.0:
            raise ValueError(f"state_dropout must be in [0, 1), got {state_dropout}")
        self.batch_first = batch_first
        self.state_dropout = state_dropout
        self.backend = kernels.check_backend(backend)

    def state_dropout_mask(self, batch, like):
        """The per-window mask (batch, hidden), scaled by 1/(1 − p); None when not in use."""
        p = self.state_dropout
        if not self.training or p == 0.0:
            return None
        return like.new_empty(batch, self.hidden_size).bernoulli_(1.0 - p) / (1.0 - p)

    def forward(self, x, state=None):
        if x.dim() != 3:
            layout = "(batch, time, input_size)" if self.batch_first else "(time, batch, input_size)"
            raise ValueError(f"LEM expects input of shape {layout}, got {x.dim()} dimensions {tuple(x.shape)}")
        self._check_features(x)
        if self.batch_first:
            x = x.transpose(0, 1)
        if x.size(0) == 0:
            raise ValueError("LEM expects at least one time step")
        y, z = self._initial_state(state, x.size(1), x)
        y_mask = self.state_dropout_mask(x.size(1), x)
        backend = kernels.resolve(self.backend, x.device, self.hidden_size, x.dtype)
        out = None
        if backend != "reference":  # None: the GPU tiers failed to launch (warned)
            out = kernels.fused(backend, x, self.inp2hid, y, z, self.hid2hid, self.transform_z, y_mask, self.dt)
        if out is None:
            u_proj = self.inp2hid(x)  # the input projection of all T steps in one GEMM
            out = self._reference_loop(u_proj, y, z, y_mask)
        ys, z = out
        dtype = kernels.gemm_dtype(x.device, x.dtype)  # under autocast, every backend's outputs in its dtype
        if dtype is not None and ys.dtype != dtype:
            ys, z = ys.to(dtype), z.to(dtype)
        y = ys[-1]
        if self.batch_first:
            ys = ys.transpose(0, 1)
        return ys, (y, z)

    def _reference_loop(self, u_proj, y, z, y_mask):
        ys = []
        for u in u_proj:
            y, z = lem_step(u, y, z, self.hid2hid, self.transform_z, self.dt, y_mask)
            ys.append(y)
        return torch.stack(ys), z


def make_rnn(model, input_size, hidden_size, dt=1.0, backend="auto"):
    """The recurrent layer of a model: 'lem', or the paper's baselines 'lstm' and 'gru' (time-first).
    backend: LEM's time-loop backend (see LEM)."""
    if model == "lem":
        return LEM(input_size, hidden_size, dt, backend=backend)
    if model == "lstm":
        return nn.LSTM(input_size, hidden_size)
    if model == "gru":
        return nn.GRU(input_size, hidden_size)
    raise ValueError(f"model must be one of 'lem', 'lstm', 'gru', got {model!r}")


class RNNModel(nn.Module):
    """Recurrent layer + linear head (SPEC §1 "Heads").

    head='last': out = classifier(y_T)     (classification, scalar regression; y at each
                                           series' own last step with forward(x, lengths))
    head='every': out = classifier(y_n)    at every step (sequence-to-sequence)
    Input is time-first (T, B, I). Attribute names `cell` and `classifier` are the reference
    code's, so its whole-model checkpoints load with `load_reference_state_dict`.
    """

    def __init__(self, model, input_size, hidden_size, output_size, dt=1.0, head="last", input_dropout=0.0):
        super().__init__()
        if head not in ("last", "every"):
            raise ValueError(f"head must be 'last' or 'every', got {head!r}")
        self.head = head
        self.input_dropout = nn.Dropout(input_dropout)
        self.cell = make_rnn(model, input_size, hidden_size, dt)
        self.classifier = nn.Linear(hidden_size, output_size)
        nn.init.kaiming_normal_(self.classifier.weight)

    def forward(self, x, lengths=None):
        """lengths: optional (B,) true lengths of a zero-padded batch; head='last' then reads each
        series' state at its own last real step, y_{lengths[b]}, never at padding."""
        ys = self.cell(self.input_dropout(x))[0]
        if self.head == "every":
            return self.classifier(ys)
        if lengths is None:
            return self.classifier(ys[-1])
        lengths = torch.as_tensor(lengths, device=ys.device)
        if lengths.shape != (ys.size(1),) or lengths.min() < 1 or lengths.max() > ys.size(0):
            raise ValueError(f"lengths must hold one length in [1, T = {ys.size(0)}] per series of the batch "
                             f"({ys.size(1)}), got {lengths.tolist()}")
        return self.classifier(ys[lengths - 1, torch.arange(ys.size(1), device=ys.device)])


def load_reference_state_dict(model, state_dict):
    """Load a checkpoint of the authors' code into an RNNModel.

    Their models name the cell `cell` (most experiments) or `rnn`, and the head `classifier`;
    both spellings are accepted. Returns what `load_state_dict` returns (strict).
    """
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("rnn."):
            key = "cell." + key[len("rnn."):]
        renamed[key] = value
    return model.load_state_dict(renamed)
