"""lem.LEM as a drop-in for nn.LSTM: arguments, shapes and errors as nn.LSTM's; stacks equal to
single-layer LEMs composed by hand; a PackedSequence equal to running each sequence alone."""
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import lem
from lem.tools import bench
from asserts import assert_packed_is_each_sequence_alone

T, B, I, H = 5, 3, 4, 6
NAMES = ("inp2hid", "hid2hid", "transform_z")


def composition(stack, x, state=None):
    """`stack` computed as plain single-layer LEMs: layer k, direction d is LEM(in, H) run with the
    stack's own parameters named {name}{suffix}; the reverse direction reads the time-flipped input;
    nn.LSTM's dropout between layers. Takes and returns what the stack does (not packed)."""
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(1)
        state = state and tuple(s.unsqueeze(1) for s in state)
    elif stack.batch_first:
        x = x.transpose(0, 1)
    D = 2 if stack.bidirectional else 1
    y_n, z_n = [], []
    for k in range(stack.num_layers):
        if k > 0:
            x = F.dropout(x, stack.dropout, stack.training)
        outputs = []
        for d in range(D):
            suffix = ("" if k == 0 else f"_l{k}") + ("_reverse" if d else "")
            with torch.random.fork_rng():  # its initialisation must not move the dropout draws
                single = lem.LEM(x.size(-1), H, bias=stack.bias, dt=stack.dt, state_dropout=stack.state_dropout,
                                 backend="reference").train(stack.training)
            params = {f"{name}.{p}": getattr(getattr(stack, name + suffix), p)
                      for name in NAMES for p in (("weight", "bias") if stack.bias else ("weight",))}
            i = k * D + d
            s = state and (state[0][i:i + 1], state[1][i:i + 1])
            ys, (y, z) = torch.func.functional_call(single, params, (x.flip(0) if d else x, s))
            outputs.append(ys.flip(0) if d else ys)
            y_n.append(y)
            z_n.append(z)
        x = torch.cat(outputs, -1)
    y_n, z_n = torch.cat(y_n), torch.cat(z_n)
    if not batched:
        return x.squeeze(1), (y_n.squeeze(1), z_n.squeeze(1))
    return (x.transpose(0, 1) if stack.batch_first else x), (y_n, z_n)


def outputs_and_grads(module_fn, x, state, params):
    out, (y, z) = module_fn(x, state)
    g = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (out, y, z))
    inputs = [x, *(state or ()), *params]
    return [out, y, z, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("num_layers, bidirectional, batch_first, batched, bias",
                         list(itertools.product([1, 2, 3], [False, True], [False, True], [True, False], [True, False])))
def test_shapes_as_lstm_and_numbers_as_composed_single_layers(num_layers, bidirectional, batch_first, batched, bias):
    torch.manual_seed(0)
    args = dict(input_size=I, hidden_size=H, num_layers=num_layers, bias=bias, batch_first=batch_first,
                bidirectional=bidirectional)
    layer, lstm = lem.LEM(**args, dt=0.6, backend="reference"), nn.LSTM(**args)
    assert layer.flatten_parameters() is None
    assert 2 * len(list(layer.parameters())) == 3 * len(list(lstm.parameters()))  # 3 linears, nn.LSTM 2 weights
    x = torch.randn(((B, T, I) if batch_first else (T, B, I)) if batched else (T, I), requires_grad=True)
    D = 2 if bidirectional else 1
    state_shape = (D * num_layers, B, H) if batched else (D * num_layers, H)
    state = (torch.randn(state_shape, requires_grad=True), torch.randn(state_shape, requires_grad=True))
    for s in (None, state):
        out, (y, z) = layer(x, s)
        lstm_out, (h, c) = lstm(x, s)
        assert (out.shape, y.shape, z.shape) == (lstm_out.shape, h.shape, c.shape)
        got = outputs_and_grads(layer, x, s, list(layer.parameters()))
        expected = outputs_and_grads(lambda x, s: composition(layer, x, s), x, s, list(layer.parameters()))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)


def test_dropout_between_layers_and_state_dropout_in_every_layer_and_direction():
    torch.manual_seed(0)
    layer = lem.LEM(I, H, 2, dropout=0.4, bidirectional=True, dt=0.6, state_dropout=0.3, backend="reference")
    x = torch.randn(T, B, I)
    torch.manual_seed(1)
    out = layer(x)[0]
    torch.manual_seed(1)  # the same draws in the same order: composition is exact only if they match
    torch.testing.assert_close(out, composition(layer, x)[0])
    torch.manual_seed(2)
    assert not torch.allclose(layer(x)[0], out)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], composition(layer, x)[0])
    with pytest.warns(UserWarning, match="dropout option adds dropout after all but last recurrent layer"):
        one = lem.LEM(I, H, dropout=0.5)  # nn.LSTM's warning: nothing to drop between layers
    torch.testing.assert_close(one(x)[0], one(x)[0], rtol=0, atol=0)  # and nothing dropped after the last


def test_parameter_names():
    single = lem.LEM(I, H)
    assert list(single.state_dict()) == [f"{n}.{p}" for n in NAMES for p in ("weight", "bias")]
    stack = lem.LEM(I, H, 2, bias=False, bidirectional=True)
    shapes = {k: tuple(v.shape) for k, v in stack.state_dict().items()}
    assert shapes == {
        "inp2hid.weight": (4 * H, I), "hid2hid.weight": (3 * H, H), "transform_z.weight": (H, H),
        "inp2hid_reverse.weight": (4 * H, I), "hid2hid_reverse.weight": (3 * H, H), "transform_z_reverse.weight": (H, H),
        "inp2hid_l1.weight": (4 * H, 2 * H), "hid2hid_l1.weight": (3 * H, H), "transform_z_l1.weight": (H, H),
        "inp2hid_l1_reverse.weight": (4 * H, 2 * H), "hid2hid_l1_reverse.weight": (3 * H, H),
        "transform_z_l1_reverse.weight": (H, H)}


@pytest.mark.parametrize("args, kwargs", [
    ((3.0, 5), {}), ((3, 5.0), {}), ((3, 0), {}), ((3, -2), {}),
    ((3, 5, 0), {}), ((3, 5, -1), {}), ((3, 5, 2.0), {}), ((3, 5, "2"), {}),
    ((3, 5, 2), dict(dropout=1.5)), ((3, 5, 2), dict(dropout=-0.1)), ((3, 5, 2), dict(dropout=True)),
    ((3, 5, 2), dict(dropout="0.2")),
])
def test_bad_arguments_raise_what_lstm_raises(args, kwargs):
    with pytest.raises(Exception) as lstm_error:
        nn.LSTM(*args, **kwargs)
    with pytest.raises(type(lstm_error.value)):
        lem.LEM(*args, **kwargs)


def test_positional_dt_of_old_code_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"num_layers should be of type int.*pass it by name: dt=0.00017"):
        lem.LEM(6, 32, 0.00017)
    with pytest.raises(TypeError, match=r"bias should be a bool.*pass it by name: dt=0.7"):
        lem.LEMCell(3, 6, 0.7)
    assert lem.LEM(6, 32, dt=0.00017).dt == 0.00017 and lem.LEMCell(3, 6, dt=0.7).dt == 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lem.LEM(3, 5, 2, dropout=0.5)  # dropout between two layers: no warning


PACKED = pack_sequence([torch.randn(4, I), torch.randn(2, I)])
BAD_CALLS = {
    "4-D input": lambda m: m(torch.randn(T, B, I, 1)),
    "1-D input": lambda m: m(torch.randn(I)),
    "wrong input_size": lambda m: m(torch.randn(T, B, I + 1)),
    "wrong input_size, unbatched": lambda m: m(torch.randn(T, I + 1)),
    "no time step": lambda m: m(torch.randn(0, B, I)),
    "float64 input": lambda m: m(torch.randn(T, B, I, dtype=torch.float64)),
    "2-D state, batched input": lambda m: m(torch.randn(T, B, I), (torch.zeros(B, H), torch.zeros(B, H))),
    "3-D state, unbatched input": lambda m: m(torch.randn(T, I), (torch.zeros(4, 1, H), torch.zeros(4, 1, H))),
    "y0 of one layer": lambda m: m(torch.randn(T, B, I), (torch.zeros(1, B, H), torch.zeros(4, B, H))),
    "z0 of another batch": lambda m: m(torch.randn(T, B, I), (torch.zeros(4, B, H), torch.zeros(4, B + 1, H))),
    "wrong hidden size": lambda m: m(torch.randn(T, I), (torch.zeros(4, H + 1), torch.zeros(4, H))),
    "state a tensor": lambda m: m(torch.randn(T, B, I), torch.zeros(4, B, H)),
    "packed, wrong state": lambda m: m(PACKED, (torch.zeros(4, 3, H), torch.zeros(4, 3, H))),
    "packed, wrong input_size": lambda m: m(pack_sequence([torch.randn(3, I + 1)])),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_inputs_and_states_raise_what_lstm_raises(call):
    with pytest.raises(Exception) as lstm_error:
        call(nn.LSTM(I, H, 2, bidirectional=True))
    with pytest.raises(type(lstm_error.value)) as lem_error:
        call(lem.LEM(I, H, 2, bidirectional=True))
    assert isinstance(lem_error.value, ValueError)  # the project's rule: bad input is a ValueError


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("num_layers, bidirectional, batch_first, bias", [(1, False, False, True), (2, True, True, False)])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_batch_is_each_sequence_alone(backend, num_layers, bidirectional, batch_first, bias, enforce_sorted):
    assert_packed_is_each_sequence_alone(backend, num_layers, bidirectional, batch_first, enforce_sorted, bias)


def test_fused_stack_matches_reference_stack():
    """Layers and directions on the fused CPU path: each runs the fused kernel."""
    torch.manual_seed(0)
    ref = lem.LEM(I, H, 2, batch_first=True, bidirectional=True, dt=0.6, state_dropout=0.3, backend="reference")
    fused = lem.LEM(I, H, 2, batch_first=True, bidirectional=True, dt=0.6, state_dropout=0.3, backend="cpp")
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.double(), fused.double()
    x = torch.randn(B, T, I, dtype=torch.double, requires_grad=True)
    state = tuple(torch.randn(4, B, H, dtype=torch.double, requires_grad=True) for _ in range(2))
    results = []
    for layer in (fused, ref):
        torch.manual_seed(1)  # the same state-dropout masks
        results.append(outputs_and_grads(layer, x, state, list(layer.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_bench_times_a_stack(monkeypatch):
    monkeypatch.setitem(bench.CONFIGS, "tiny_stack", (6, 4, 8, 2))
    monkeypatch.setitem(bench.STACKS, "tiny_stack", dict(num_layers=2, bidirectional=True))
    rows = bench.bench_config("tiny_stack", torch.device("cpu"), repeats=1, budget_s=1.0)
    assert set(rows) == {"reference", "cpp", "nn.LSTM"}
    assert "num_layers 2, bidirectional True" in bench.table("tiny_stack", torch.device("cpu"), rows)
