"""Assertions that several test modules share: a backend against the reference loop, a packed
batch against each sequence alone, a compiled layer against eager."""
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import lem
from lem import kernels

I, H = 4, 6  # the packed-sequence checks' sizes


def run(layer, x, state, seed=1):
    """Outputs and the gradients of a loss touching ys, y_T and z_T w.r.t. inputs, states, parameters."""
    torch.manual_seed(seed)  # the same state-dropout mask for every backend
    ys, (y, z) = layer(x, state)
    weights = torch.randn(ys.shape, generator=torch.Generator().manual_seed(2), dtype=ys.dtype).to(ys.device)
    loss = (ys * weights).sum() + (y ** 2).sum() + (2 * z).sum()
    inputs = [x, *(state or ()), *layer.parameters()]
    return [ys, y, z, *torch.autograd.grad(loss, inputs)]


def compiled_outputs_and_grads(model, x):
    out, (y, z) = model(x)
    loss = out.square().sum() + y.sum() + (2 * z).sum()
    return [out, y, z, *torch.autograd.grad(loss, [x, *model.parameters()])]


def loss_of(out, y_n, z_n, lengths):
    """A weighted sum of every real output and both final states (weights fixed per sequence)."""
    g = torch.Generator().manual_seed(5)
    weights = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
    total = 0
    for b, n in enumerate(lengths):
        total = total + (out[b][:n] * weights(out[b][:n])).sum()
    for s in (y_n, z_n):
        total = total + (s * weights(s)).sum()
    return total


def assert_packed_is_each_sequence_alone(backend, num_layers, bidirectional, batch_first, enforce_sorted, bias=True,
                                         dtype=torch.double, device="cpu"):
    """A PackedSequence of unequal lengths through `backend` gives, for each sequence, what running it
    alone (unbatched, no lengths) gives: outputs, both final states, and the gradients of a loss of
    all of them w.r.t. every sequence, the initial state and every parameter."""
    torch.manual_seed(0)
    layer = lem.LEM(I, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, dt=0.6,
                    backend=backend).to(device, dtype)
    lengths = [7, 5, 5, 2] if enforce_sorted else [3, 7, 1, 5]
    seqs = [torch.randn(n, I, dtype=dtype, device=device, requires_grad=True) for n in lengths]
    D = 2 if bidirectional else 1
    y0, z0 = (torch.randn(D * num_layers, len(lengths), H, dtype=dtype, device=device, requires_grad=True)
              for _ in range(2))
    inputs = [*seqs, y0, z0, *layer.parameters()]

    packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    out, (y_n, z_n) = layer(packed, (y0, z0))
    lstm_out = nn.LSTM(I, H, num_layers, bidirectional=bidirectional).to(device, dtype)(packed)[0]
    assert out.data.shape == lstm_out.data.shape and torch.equal(out.batch_sizes, lstm_out.batch_sizes)
    for a, b in ((out.sorted_indices, lstm_out.sorted_indices), (out.unsorted_indices, lstm_out.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    padded = pad_packed_sequence(out, batch_first=True)[0]
    grads = torch.autograd.grad(loss_of(padded, y_n, z_n, lengths), inputs)

    alone = [layer(s, (y0[:, b], z0[:, b])) for b, s in enumerate(seqs)]  # unbatched, no lengths
    for b, (o, (y, z)) in enumerate(alone):
        torch.testing.assert_close(padded[b, :lengths[b]], o)
        torch.testing.assert_close(y_n[:, b], y)
        torch.testing.assert_close(z_n[:, b], z)
    alone_loss = loss_of([o for o, _ in alone], torch.stack([y for _, (y, _) in alone], 1),
                         torch.stack([z for _, (_, z) in alone], 1), lengths)
    for g, r in zip(grads, torch.autograd.grad(alone_loss, inputs)):
        torch.testing.assert_close(g, r)


def assert_compiled_is_eager(backend, device="cpu"):
    """A 2-layer bidirectional LEM with state dropout compiled as one graph (fullgraph: any graph
    break fails) by AOTAutograd without code generation: the fake implementations and autograd of
    the operators traced, then the same kernels run, so outputs and gradients are the eager ones bit
    for bit; under torch.no_grad() too (the activations-free path, a graph of its own)."""
    torch.manual_seed(0)
    layer = lem.LEM(3, 8, 2, bidirectional=True, dt=0.6, state_dropout=0.3, backend=backend).to(device)
    x = torch.randn(6, 4, 3, device=device, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for model in (compiled, layer):
        torch.manual_seed(1)  # the same state-dropout masks
        results.append(compiled_outputs_and_grads(model, x))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(compiled(x)[0], layer(x)[0])


def assert_matches(backend, T, B, H, I, batch_first=False, with_state=False, state_dropout=0.0, dt=0.7,
                   device="cpu", tol=1e-5, bias=True):
    torch.manual_seed(0)
    args = dict(bias=bias, dt=dt, batch_first=batch_first, state_dropout=state_dropout)
    ref = lem.LEM(I, H, **args, backend="reference").to(device)
    fused = lem.LEM(I, H, **args, backend=backend).to(device)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn((B, T, I) if batch_first else (T, B, I), device=device, requires_grad=True)
    assert kernels.resolve(backend, x.device, H, x.dtype) == backend, "the fused path did not build"
    state = None
    if with_state:
        state = tuple(torch.randn(1, B, H, device=device, requires_grad=True) for _ in range(2))
    names = ["ys", "y_T", "z_T", "x", *(["y0", "z0"] if with_state else []), *(n for n, _ in ref.named_parameters())]
    for name, a, b in zip(names, run(fused, x, state), run(ref, x, state)):
        assert_close_relative(a, b, f"{backend}: {name}", tol)


def assert_close_relative(a, b, name, tol=1e-5):
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    assert err <= tol, f"{name} differs from the reference by {err:.2e} (relative to its largest entry)"


def assert_lengths_match(backend, T, B, H, I, lengths, bias=True, with_mask=False, device="cpu", tol=1e-5):
    """One layer run by kernels.fused with per-row lengths (any order) against the reference loop:
    ys, z_T and the gradients of x (zero past each row's length), y0, z0 and every parameter; and a
    call no backward can follow gives the training call's outputs bit for bit."""
    torch.manual_seed(0)
    layer = lem.LEM(I, H, bias=bias, dt=0.7).to(device)
    assert kernels.resolve(backend, torch.device(device), H) == backend, "the fused path did not build"
    x = torch.randn(T, B, I, device=device, requires_grad=True)
    y0, z0 = (torch.randn(B, H, device=device, requires_grad=True) for _ in range(2))
    mask = torch.rand(B, H, device=device) * 2 if with_mask else None
    lengths = torch.tensor(lengths, device=device)
    linears = (layer.inp2hid, layer.hid2hid, layer.transform_z)
    calls = {"fused": lambda: kernels.fused(backend, x, linears[0], y0, z0, *linears[1:], mask, layer.dt, lengths),
             "reference": lambda: layer._reference_loop(linears[0](x), y0, z0, *linears[1:], mask, lengths)}
    weights = torch.randn(T, B, H, generator=torch.Generator().manual_seed(2)).to(device)
    results = {}
    for name, call in calls.items():
        ys, z = call()
        loss = (ys * weights).sum() + (2 * z).sum()
        results[name] = [ys, z, *torch.autograd.grad(loss, [x, y0, z0, *layer.parameters()])]
    names = ["ys", "z_T", "x", "y0", "z0", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, results["fused"], results["reference"]):
        assert_close_relative(a, b, f"{backend} with lengths: {name}", tol)
    with torch.no_grad():
        ys, z = calls["fused"]()
    assert torch.equal(ys, results["fused"][0]) and torch.equal(z, results["fused"][1])
