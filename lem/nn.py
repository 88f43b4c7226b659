"""The LEM layer (docs/paper.md §1) and the small models every experiment is built from.

    Δt_n  = Δt · σ(W1 y_{n-1} + V1 u_n + b1)        gate of z
    Δt̄_n  = Δt · σ(W2 y_{n-1} + V2 u_n + b2)        gate of y
    z_n   = (1 − Δt_n) ⊙ z_{n-1} + Δt_n ⊙ tanh(Wz y_{n-1} + Vz u_n + bz)
    y_n   = (1 − Δt̄_n) ⊙ y_{n-1} + Δt̄_n ⊙ tanh(Wy z_n + Vy u_n + by)

Parameters keep the reference code's layout so its checkpoints load unchanged:
inp2hid = Linear(I, 4H) with rows [V2, V1, Vy, Vz], hid2hid = Linear(H, 3H) with rows
[W2, W1, Wz], transform_z = Linear(H, H) = Wy. `LEM` stacks layers and directions with the
interface of nn.LSTM, one such triple each (names: see LEM).
"""
import math
import numbers
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import kernels
from .kernels.reference import lem_step, time_loop


class ShapeError(ValueError, RuntimeError):
    """An input or state of the wrong shape. Both a ValueError (this project's error for bad input)
    and a RuntimeError (what nn.LSTM raises for the same mistakes), so code written for either catches it."""


def _dt_hint(value):
    """Old code passed Δt as the third positional argument: say how to pass it now."""
    return f"; if {value!r} is LEM's time step Δt, pass it by name: dt={value!r}" if isinstance(value, float) else ""


def _check_count(name, value):
    """A positive int, with nn.LSTM's errors (TypeError for another type, ValueError for <= 0)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}{_dt_hint(value)}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")


def _checked_state(state, shape, layout, like):
    """(y0, z0) checked to have `shape` (described as `layout`) and the dtype and device of the input
    `like`, or zeros of that shape."""
    if state is None:
        zeros = like.new_zeros(shape)
        return zeros, zeros
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise ShapeError(f"state must be a tuple (y0, z0) of two tensors of shape {layout} = {shape}, "
                         f"got {type(state).__name__}")
    for i, (name, s) in enumerate(zip(("y0", "z0"), state)):
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != shape:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ShapeError(f"expected {name} = state[{i}] of shape {layout} = {shape}, got {got}")
        if s.dtype != like.dtype or s.device != like.device:
            raise ValueError(f"expected {name} = state[{i}] with the input's dtype {like.dtype} on its device "
                             f"{like.device}, got {s.dtype} on {s.device}")
    return tuple(state)


class _LEMBase(nn.Module):
    """Argument checks and the linears of docs/paper.md §1 with their initialisation, for LEMCell and LEM."""

    def __init__(self, input_size, hidden_size, bias, dt):
        super().__init__()
        _check_count("input_size", input_size)
        _check_count("hidden_size", hidden_size)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be a bool, got: {type(bias).__name__}{_dt_hint(bias)}")
        if isinstance(dt, bool) or not isinstance(dt, numbers.Real):
            raise TypeError(f"dt should be a number, got: {type(dt).__name__}")
        if not dt > 0:
            raise ValueError(f"dt must be > 0, got {dt}")
        self.input_size, self.hidden_size, self.bias, self.dt = input_size, hidden_size, bias, float(dt)

    def _add_linears(self, suffix, input_size, factory):
        """inp2hid, hid2hid, transform_z (the layout table of docs/paper.md §1); bias=False: no bias in any.
        Out of memory: the error names the Linear and its size."""
        H = self.hidden_size
        for name, (n_in, n_out) in {"inp2hid": (input_size, 4 * H), "hid2hid": (H, 3 * H), "transform_z": (H, H)}.items():
            try:
                setattr(self, f"{name}{suffix}", nn.Linear(n_in, n_out, self.bias, **factory))
            except RuntimeError as e:  # torch.OutOfMemoryError on a GPU; on CPU the allocator's RuntimeError
                if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                    raise
                size = n_in * n_out * (factory.get("dtype") or torch.get_default_dtype()).itemsize
                raise type(e)(f"{type(self).__name__}(hidden_size={H}): out of memory making {name}{suffix} = "
                              f"Linear({n_in}, {n_out}), a weight of {size / 2**30:.3g} GiB ({e})") from e

    def _linears(self, suffix=""):
        return tuple(getattr(self, f"{name}{suffix}") for name in ("inp2hid", "hid2hid", "transform_z"))

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: refuse with a clear error instead of TorchScript's."""
        raise RuntimeError(f"{type(self).__name__} cannot be compiled by torch.jit.script (its forward is Python "
                           "that TorchScript does not take); torch.compile compiles it, torch.export.export exports it")

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _check_input(self, x):
        """x (..., input_size), floating point, in the parameters' dtype (nn.LSTM's check; autocast may
        differ)."""
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        if x.size(-1) != self.input_size:
            raise ShapeError(f"expected input_size = {self.input_size} features in the last dimension, got {x.size(-1)}")
        dtype = next((p.dtype for p in self.inp2hid.parameters() if p.is_floating_point()), x.dtype)  # none: quantized
        if x.dtype != dtype and not kernels.autocast_enabled(x.device):
            raise ValueError(f"input must have the type {dtype}, got type {x.dtype}")


class LEMCell(_LEMBase):
    """One LEM step with nn.LSTMCell's interface: y_n, z_n = cell(u_n, (y_{n-1}, z_{n-1})).

    u_n (batch, input_size) or unbatched (input_size,); the state of shape (batch, hidden_size) or
    (hidden_size,), zeros if not given. Parameters: inp2hid, hid2hid, transform_z (the authors' cell).
    """

    def __init__(self, input_size, hidden_size, bias=True, *, dt=1.0, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, dt)
        self._add_linears("", input_size, dict(device=device, dtype=dtype))
        self.reset_parameters()

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}{'' if self.bias else ', bias=False'}, dt={self.dt:g}"

    def forward(self, input, state=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LEMCell expects input of shape (batch, input_size) or (input_size,), "
                             f"got {input.dim()} dimensions {tuple(input.shape)}")
        self._check_input(input)
        batched = input.dim() == 2
        shape, layout = ((input.size(0), self.hidden_size), "(batch, hidden_size)") if batched else \
            ((self.hidden_size,), "(hidden_size,)")
        y, z = _checked_state(state, shape, layout, input)
        return lem_step(self.inp2hid(input), y, z, self.hid2hid, self.transform_z, self.dt)


def _suffix(layer, direction):
    """Name suffix of one layer's parameters in one direction (see LEM)."""
    return ("" if layer == 0 else f"_l{layer}") + ("_reverse" if direction else "")


def _reverse(x, lengths):
    """x (T, B, ·) with the first lengths[b] steps of each row b in reverse order and its padding
    left in place (all T steps when lengths is None). Its own inverse."""
    if lengths is None:
        return x.flip(0)
    t = torch.arange(x.size(0), device=x.device)[:, None]
    index = torch.where(t < lengths, lengths - 1 - t, t)  # (T, B)
    return x.gather(0, index[:, :, None].expand_as(x))


class LEM(_LEMBase):
    """LEM layers with the interface of nn.LSTM: output, (y_n, z_n) = LEM(...)(input, state=None).

    Arguments as nn.LSTM's (input_size, hidden_size, num_layers, bias, batch_first, dropout between
    layers, bidirectional), and LEM's own, keyword-only: dt (Δt of docs/paper.md §1), state_dropout, backend.
    Shapes, with D = 2 if bidirectional else 1, L = num_layers:
        input   (T, B, input_size), (B, T, input_size) with batch_first, (T, input_size) unbatched,
                or a PackedSequence
        output  (T, B, D·H), (B, T, D·H) with batch_first, (T, D·H) unbatched, or a PackedSequence;
                the last layer's y_n of every step, forward and reverse direction concatenated
        y_n, z_n (D·L, B, H), (D·L, H) unbatched: the final states, index layer·D + direction; for a
                PackedSequence, each sequence's own last step (the reverse direction reads every
                sequence from its own last step back to its first)
        state   an optional (y0, z0) of the shape of (y_n, z_n)

    Parameters: layer k, direction d has the three linears of docs/paper.md §1 named inp2hid{s},
    hid2hid{s}, transform_z{s}, with nn.LSTM's suffixes s = "_l{k}" and "_reverse", except that
    layer 0 has no "_l0": a single-layer LEM (and layer 0 of any stack) keeps the authors' names,
    so their checkpoints load unchanged. E.g. LEM(I, H, 2, bidirectional=True) has inp2hid,
    inp2hid_reverse, inp2hid_l1, inp2hid_l1_reverse (Linear(I, 4H), Linear(I, 4H), then
    Linear(2H, 4H) twice), and likewise hid2hid*, transform_z*.

    state_dropout > 0 (PTB, docs/paper.md §3.9): in training, variational dropout on the recurrent state:
    one mask per call and per layer and direction, multiplying y_{n-1} where it enters hid2hid at
    every step; the leaky carry (1 − Δt̄_n) ⊙ y_{n-1} and the outputs are not masked.

    backend: how the time loop runs (lem/kernels, docs/kernels.md): 'reference' (the loop below),
    'cpp' (fused CPU), 'triton' (fused GPU, the tier that fits; or a tier by name: 'onchip',
    'stepwise'), or 'auto' (the fused one for the tensors' device, 'reference' with a warning if it
    cannot be built or launched). Every backend honours state, state_dropout, bias=False and a
    PackedSequence's per-row lengths. Under torch.autocast the outputs come in the autocast dtype, as
    nn.LSTM's do. The fused backends are torch.library operators: torch.compile traces the layer
    without a graph break (a PackedSequence breaks the graph where it is padded and packed again).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, *, dt=1.0, state_dropout=0.0, backend="auto", device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, dt)
        _check_count("num_layers", num_layers)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             f"element being zeroed, got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}")
        if not 0.0 <= state_dropout < 1.0:
            raise ValueError(f"state_dropout must be in [0, 1), got {state_dropout}")
        self.num_layers, self.batch_first, self.dropout = num_layers, batch_first, float(dropout)
        self.bidirectional, self.state_dropout = bidirectional, state_dropout
        self.backend = kernels.check_backend(backend)
        D = 2 if bidirectional else 1
        for k in range(num_layers):
            for d in range(D):
                self._add_linears(_suffix(k, d), input_size if k == 0 else D * hidden_size,
                                  dict(device=device, dtype=dtype))
        self.reset_parameters()

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False), ("state_dropout", 0.0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s + f", dt={self.dt:g}"

    def flatten_parameters(self):
        """A no-op: nn.LSTM's cuDNN weight packing has no counterpart here (code calling it runs)."""

    def state_dropout_mask(self, batch, like):
        """The per-window mask (batch, hidden), scaled by 1/(1 − p); None when not in use."""
        p = self.state_dropout
        if not self.training or p == 0.0:
            return None
        return like.new_empty(batch, self.hidden_size).bernoulli_(1.0 - p) / (1.0 - p)

    def forward(self, input, state=None):
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, state)
        if input.dim() not in (2, 3):
            layout = "(batch, time, input_size)" if self.batch_first else "(time, batch, input_size)"
            raise ValueError(f"LEM expects input of shape {layout} or (time, input_size), "
                             f"got {input.dim()} dimensions {tuple(input.shape)}")
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(1)  # (T, 1, I) whatever batch_first says, as nn.LSTM
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        self._check_input(x)
        y0, z0 = self._initial_state(state, x.size(1) if batched else None, x)
        output, y_n, z_n = self._layers(x, y0, z0, None)
        if not batched:
            return output.squeeze(1), (y_n.squeeze(1), z_n.squeeze(1))
        return (output.transpose(0, 1) if self.batch_first else output), (y_n, z_n)

    def _forward_packed(self, packed, state):
        """As nn.LSTM: the state is given and returned in the caller's order of sequences; inside,
        the rows run padded in the packed (longest first) order, each for its own length."""
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if data.dim() != 2:
            raise ShapeError(f"expected a PackedSequence of 2-D data (steps, input_size), got {tuple(data.shape)}")
        x, lengths = _padded(data, batch_sizes)
        self._check_input(x)
        y0, z0 = self._initial_state(state, x.size(1), x)
        if sorted_indices is not None:
            y0, z0 = y0.index_select(1, sorted_indices), z0.index_select(1, sorted_indices)
        output, y_n, z_n = self._layers(x, y0, z0, lengths.to(x.device))
        if unsorted_indices is not None:
            y_n, z_n = y_n.index_select(1, unsorted_indices), z_n.index_select(1, unsorted_indices)
        return PackedSequence(_packed(output, lengths), batch_sizes, sorted_indices, unsorted_indices), (y_n, z_n)

    def _initial_state(self, state, batch, like):
        """(y0, z0), each (D·L, batch, H), from `state` or zeros; batch None: unbatched, given as (D·L, H)."""
        LD, H = self.num_layers * (2 if self.bidirectional else 1), self.hidden_size
        if batch is None:
            y0, z0 = _checked_state(state, (LD, H), "(num_layers * num_directions, hidden_size)", like)
            return y0.unsqueeze(1), z0.unsqueeze(1)
        return _checked_state(state, (LD, batch, H), "(num_layers * num_directions, batch, hidden_size)", like)

    def _layers(self, x, y0, z0, lengths):
        """The stack on x (T, B, input_size): the last layer's output (T, B, D·H), y_n and z_n
        (D·L, B, H). lengths: None, or (B,) per-row lengths; row b's state stays fixed after
        lengths[b] steps, so its last output and final state are those of its own last step."""
        if x.size(0) == 0:
            raise ShapeError("LEM expects at least one time step")
        backend = kernels.resolve(self.backend, x.device, self.hidden_size, x.dtype)
        D = 2 if self.bidirectional else 1
        y_n, z_n = [], []
        for k in range(self.num_layers):
            if k > 0:
                x = F.dropout(x, self.dropout, self.training)  # between layers, as nn.LSTM
            outputs = []
            for d in range(D):
                ys, y, z = self._direction(backend, _suffix(k, d), x, y0[k * D + d], z0[k * D + d], lengths, d == 1)
                outputs.append(ys)
                y_n.append(y)
                z_n.append(z)
            x = outputs[0] if D == 1 else torch.cat(outputs, -1)
        return x, torch.stack(y_n), torch.stack(z_n)

    def _direction(self, backend, suffix, x, y, z, lengths, reverse):
        """One layer in one direction over x (T, B, ·): its outputs ys (T, B, H) in x's time order and
        its final y, z. The reverse direction runs forward over every row reversed within its length."""
        if reverse:
            x = _reverse(x, lengths)
        inp2hid, hid2hid, transform_z = self._linears(suffix)
        y_mask = self.state_dropout_mask(x.size(1), x)
        out = None
        if backend != "reference":  # None: the call must run the reference loop (kernels.fused says when)
            out = kernels.fused(backend, x, inp2hid, y, z, hid2hid, transform_z, y_mask, self.dt, lengths, owner=self)
        if out is None:
            out = self._reference_loop(inp2hid(x), y, z, hid2hid, transform_z, y_mask, lengths)
        ys, z = out
        dtype = kernels.gemm_dtype(x.device, x.dtype)  # under autocast, every backend's outputs in its dtype
        if dtype is not None and ys.dtype != dtype:
            ys, z = ys.to(dtype), z.to(dtype)
        y = ys[-1]  # each row's state at its own last step: it stays fixed after it
        return (_reverse(ys, lengths) if reverse else ys), y, z

    def _reference_loop(self, u_proj, y, z, hid2hid, transform_z, y_mask, lengths):
        """The time loop in autograd ops (the fused backends' ground truth), calling the layer's own
        Linears at every step; with lengths, a masked update keeps row b's state as it is from step
        lengths[b] on."""
        ys, zs = time_loop(u_proj, y, z, hid2hid, transform_z, self.dt, y_mask, lengths)
        return ys, zs[-1]


def _eager_when_compiled(fn):
    """fn, run outside the graph (a graph break) when torch.compile traces it: for padding and
    packing, whose shapes depend on the lengths, data that torch.compile cannot trace. Wrapped only
    while compiling, so that importing lem does not import torch._dynamo (seconds: docs/kernels.md)."""
    def run(*args):
        return torch.compiler.disable(fn)(*args) if torch.compiler.is_compiling() else fn(*args)
    return run


@_eager_when_compiled
def _padded(data, batch_sizes):
    """A PackedSequence's data as (T, B, ·) and its lengths (B,), int64 on the CPU."""
    return pad_packed_sequence(PackedSequence(data, batch_sizes))


@_eager_when_compiled
def _packed(output, lengths):
    """The data of the PackedSequence of the padded (T, B, ·) output with these lengths."""
    return pack_padded_sequence(output, lengths).data


def make_rnn(model, input_size, hidden_size, dt=1.0, backend="auto"):
    """The recurrent layer of a model: 'lem', or the paper's baselines 'lstm' and 'gru' (time-first).
    backend: LEM's time-loop backend (see LEM)."""
    if model == "lem":
        return LEM(input_size, hidden_size, dt=dt, backend=backend)
    if model == "lstm":
        return nn.LSTM(input_size, hidden_size)
    if model == "gru":
        return nn.GRU(input_size, hidden_size)
    raise ValueError(f"model must be one of 'lem', 'lstm', 'gru', got {model!r}")


class RNNModel(nn.Module):
    """Recurrent layer + linear head (docs/paper.md §1 "Heads").

    head='last': out = classifier(y_T)     (classification, scalar regression; y at each
                                           series' own last step with forward(x, lengths))
    head='every': out = classifier(y_n)    at every step (sequence-to-sequence)
    Input is time-first (T, B, I). Attribute names `cell` and `classifier` are the reference
    code's, so its whole-model checkpoints load with `load_reference_state_dict`.
    backend: the time-loop backend of a LEM layer (see LEM; lstm and gru have none).
    """

    def __init__(self, model, input_size, hidden_size, output_size, dt=1.0, head="last", input_dropout=0.0,
                 backend="auto"):
        super().__init__()
        if head not in ("last", "every"):
            raise ValueError(f"head must be 'last' or 'every', got {head!r}")
        self.head = head
        self.input_dropout = nn.Dropout(input_dropout)
        self.cell = make_rnn(model, input_size, hidden_size, dt, backend)
        self.classifier = nn.Linear(hidden_size, output_size)
        nn.init.kaiming_normal_(self.classifier.weight)

    def forward(self, x, lengths=None):
        """lengths: optional (B,) true lengths of a zero-padded batch; head='last' then reads each
        series' state at its own last real step, y_{lengths[b]}, never at padding."""
        x = self.input_dropout(x)
        if self.head == "every":
            return self.classifier(self.cell(x)[0])
        if lengths is not None:
            lengths = torch.as_tensor(lengths)
            if lengths.shape != (x.size(1),) or lengths.min() < 1 or lengths.max() > x.size(0):
                raise ValueError(f"lengths must hold one length in [1, T = {x.size(0)}] per series of the batch "
                                 f"({x.size(1)}), got {lengths.tolist()}")
        if lengths is None or bool((lengths == x.size(0)).all()):  # no series ends early
            return self.classifier(self.cell(x)[0][-1])
        # The layer runs each series for its own length; its final state is y at that step.
        state = self.cell(pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False))[1]
        y_n = state[0] if isinstance(state, tuple) else state  # LEM's (y, z), LSTM's (h, c), GRU's h
        return self.classifier(y_n[-1])


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
