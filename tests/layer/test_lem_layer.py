"""lem.LEM and lem.LEMCell against a loop-by-loop transcription of docs/paper.md §1."""
import math

import pytest
import torch
import torch.nn as nn

import lem


def transcription(layer, x, y0=None, z0=None):
    """docs/paper.md §1 written out with the named blocks of the parameter layout table."""
    H, dt = layer.hidden_size, layer.dt
    V2, V1, Vy, Vz = layer.inp2hid.weight.split(H)
    W2, W1, Wz = layer.hid2hid.weight.split(H)
    Wy = layer.transform_z.weight
    if layer.bias:
        bV2, bV1, bVy, bVz = layer.inp2hid.bias.split(H)
        bW2, bW1, bWz = layer.hid2hid.bias.split(H)
        bWy = layer.transform_z.bias
    else:  # bias=False: no bias anywhere
        bV2 = bV1 = bVy = bVz = bW2 = bW1 = bWz = bWy = torch.zeros(H, dtype=x.dtype)
    b1, b2, bz, by = bV1 + bW1, bV2 + bW2, bVz + bWz, bVy + bWy
    y = torch.zeros(x.size(1), H, dtype=x.dtype) if y0 is None else y0
    z = torch.zeros(x.size(1), H, dtype=x.dtype) if z0 is None else z0
    ys = []
    for u in x:
        dt_n = dt * torch.sigmoid(y @ W1.T + u @ V1.T + b1)
        dt_bar = dt * torch.sigmoid(y @ W2.T + u @ V2.T + b2)
        z = (1 - dt_n) * z + dt_n * torch.tanh(y @ Wz.T + u @ Vz.T + bz)
        y = (1 - dt_bar) * y + dt_bar * torch.tanh(z @ Wy.T + u @ Vy.T + by)
        ys.append(y)
    return torch.stack(ys), (y, z)


@pytest.mark.parametrize("T,B,I,H,dt,bias", [(9, 3, 4, 5, 0.3, True), (1, 1, 1, 7, 1.0, True), (20, 2, 3, 16, 0.05, True),
                                           (9, 3, 4, 5, 0.3, False)])
def test_outputs_and_gradients_match_transcription(T, B, I, H, dt, bias):
    torch.manual_seed(0)
    layer = lem.LEM(I, H, bias=bias, dt=dt).double()
    assert len(list(layer.parameters())) == (6 if bias else 3)
    x = torch.randn(T, B, I, dtype=torch.double, requires_grad=True)
    y0 = torch.randn(1, B, H, dtype=torch.double, requires_grad=True)
    z0 = torch.randn(1, B, H, dtype=torch.double, requires_grad=True)
    ys, (yT, zT) = layer(x, (y0, z0))
    ref_ys, (ref_y, ref_z) = transcription(layer, x, y0[0], z0[0])
    torch.testing.assert_close(ys, ref_ys)
    torch.testing.assert_close(zT, ref_z[None])
    torch.testing.assert_close(yT, ys[-1:])

    weights = torch.randn_like(ys)
    inputs = [x, y0, z0, *layer.parameters()]
    grads = torch.autograd.grad((ys * weights).sum() + zT.sum(), inputs)
    ref_grads = torch.autograd.grad((ref_ys * weights).sum() + ref_z.sum(), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_gradcheck_float64():
    torch.manual_seed(1)
    layer = lem.LEM(2, 3, dt=0.5).double()
    x = torch.randn(4, 2, 2, dtype=torch.double, requires_grad=True)
    y0 = torch.randn(1, 2, 3, dtype=torch.double, requires_grad=True)
    z0 = torch.randn(1, 2, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y0, z0: layer(x, (y0, z0))[0], (x, y0, z0))
    params = list(layer.parameters())
    assert torch.autograd.gradcheck(lambda *p: torch.func.functional_call(
        layer, dict(zip([n for n, _ in layer.named_parameters()], p)), (x.detach(),))[0], tuple(p.detach().requires_grad_() for p in params))


def test_initialisation_is_uniform_in_one_over_sqrt_h():
    layer = lem.LEM(3, 64)
    bound = 1 / math.sqrt(64)
    for name, p in layer.named_parameters():
        assert p.abs().max() <= bound, name
        assert p.abs().max() > 0.9 * bound, name


def test_cell_is_one_step_of_the_layer():
    torch.manual_seed(2)
    layer = lem.LEM(3, 6, dt=0.7)
    cell = lem.LEMCell(3, 6, dt=0.7)
    cell.load_state_dict(layer.state_dict())
    x = torch.randn(5, 4, 3)
    ys, _ = layer(x)
    y = z = torch.zeros(4, 6)
    for t in range(5):
        y, z = cell(x[t], (y, z))
        torch.testing.assert_close(y, ys[t])


def test_batch_first_matches_time_first():
    torch.manual_seed(3)
    layer = lem.LEM(3, 5)
    bf = lem.LEM(3, 5, batch_first=True)
    bf.load_state_dict(layer.state_dict())
    x = torch.randn(7, 2, 3)
    ys, (y, z) = layer(x)
    ys_bf, (y_bf, z_bf) = bf(x.transpose(0, 1))
    torch.testing.assert_close(ys_bf, ys.transpose(0, 1))
    torch.testing.assert_close((y_bf, z_bf), (y, z))


def test_two_halves_with_carried_state_equal_one_run():
    torch.manual_seed(4)
    layer = lem.LEM(2, 8, dt=0.2)
    x = torch.randn(12, 3, 2)
    ys, (y, z) = layer(x)
    ys1, state = layer(x[:5])
    ys2, (y2, z2) = layer(x[5:], state)
    torch.testing.assert_close(torch.cat([ys1, ys2]), ys)
    torch.testing.assert_close((y2, z2), (y, z))


@pytest.mark.parametrize("make_call, message", [
    (lambda m: m(torch.randn(3)), "dimensions"),
    (lambda m: m(torch.randn(2, 5, 3, 4)), "dimensions"),
    (lambda m: m(torch.randn(5, 2, 4)), "input_size = 3"),
    (lambda m: m(torch.randn(0, 2, 3)), "at least one time step"),
    (lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 6), torch.zeros(1, 2, 5))), r"y0 = state\[0\] of shape .* = \(1, 2, 5\)"),
    (lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 5), torch.zeros(2, 5))), "z0"),
    (lambda m: m(torch.randn(5, 3), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))), r"\(1, 5\)"),
    (lambda m: m(torch.randn(5, 2, 3), torch.zeros(1, 2, 5)), "tuple"),
])
def test_bad_input_raises_value_error(make_call, message):
    with pytest.raises(ValueError, match=message):
        make_call(lem.LEM(3, 5))


@pytest.mark.parametrize("kwargs", [dict(dt=0.0), dict(dt=-1.0), dict(hidden_size=0)])
def test_bad_construction_raises_value_error(kwargs):
    args = {"input_size": 3, "hidden_size": 5, **kwargs}
    with pytest.raises(ValueError):
        lem.LEM(**args)


def test_cell_bad_input():
    cell = lem.LEMCell(3, 5)
    with pytest.raises(ValueError, match="batch, input_size"):
        cell(torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match="input_size = 3"):
        cell(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"y0 .* \(4, 5\)"):
        cell(torch.randn(4, 3), (torch.zeros(5), torch.zeros(5)))


BAD_DTYPES = {  # (input, state) of a 3-input, 5-hidden LEM and LEMCell, batch 2
    "integer input": (lambda: torch.ones(4, 2, 3, dtype=torch.long), None, TypeError, "floating-point input, got torch.int64"),
    "bool input": (lambda: torch.ones(4, 2, 3, dtype=torch.bool), None, TypeError, "got torch.bool"),
    "float64 state": (lambda: torch.randn(4, 2, 3), torch.float64, ValueError,
                      r"y0 = state\[0\] with the input's dtype torch.float32 on its device cpu, got torch.float64 on cpu"),
    "state on another device": (lambda: torch.randn(4, 2, 3), "meta", ValueError,
                                r"input's dtype torch.float32 on its device cpu, got torch.float32 on meta"),
}


@pytest.mark.parametrize("case", BAD_DTYPES.values(), ids=BAD_DTYPES.keys())
@pytest.mark.parametrize("module", ["LEM", "LEMCell"])
def test_bad_dtype_or_device_says_what_was_expected(module, case):
    make_input, state_kind, error, message = case
    layer = getattr(lem, module)(3, 5)
    x = make_input() if module == "LEM" else make_input()[0]
    state = None
    if state_kind is not None:
        shape = (1, 2, 5) if module == "LEM" else (2, 5)
        dtype, device = (state_kind, "cpu") if isinstance(state_kind, torch.dtype) else (torch.float32, state_kind)
        state = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape))
    with pytest.raises(error, match=message):
        layer(x, state)


def test_cell_unbatched_is_a_batch_of_one():
    torch.manual_seed(7)
    cell = lem.LEMCell(3, 5, dt=0.5)
    x, y, z = torch.randn(3), torch.randn(5), torch.randn(5)
    one = cell(x, (y, z))
    batch = cell(x[None], (y[None], z[None]))
    torch.testing.assert_close(one, tuple(s[0] for s in batch))


def test_state_dropout_zero_equals_plain_layer_and_eval_ignores_it():
    torch.manual_seed(5)
    plain = lem.LEM(3, 6)
    dropped = lem.LEM(3, 6, state_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(6, 2, 3)
    dropped.eval()
    torch.testing.assert_close(dropped(x)[0], plain(x)[0])
    dropped.train()
    assert not torch.allclose(dropped(x)[0], plain(x)[0])
    with pytest.raises(ValueError):
        lem.LEM(3, 6, state_dropout=1.0)


class ReferenceLEMCell(nn.Module):
    """The authors' cell, as published (their variable names)."""

    def __init__(self, ninp, nhid, dt):
        super().__init__()
        self.ninp, self.nhid, self.dt = ninp, nhid, dt
        self.inp2hid = nn.Linear(ninp, 4 * nhid)
        self.hid2hid = nn.Linear(nhid, 3 * nhid)
        self.transform_z = nn.Linear(nhid, nhid)

    def forward(self, x, y, z):
        transformed_inp = self.inp2hid(x)
        transformed_hid = self.hid2hid(y)
        i_dt1, i_dt2, i_z, i_y = transformed_inp.chunk(4, 1)
        h_dt1, h_dt2, h_y = transformed_hid.chunk(3, 1)
        ms_dt_bar = self.dt * torch.sigmoid(i_dt1 + h_dt1)
        ms_dt = self.dt * torch.sigmoid(i_dt2 + h_dt2)
        z = (1. - ms_dt) * z + ms_dt * torch.tanh(i_y + h_y)
        y = (1. - ms_dt_bar) * y + ms_dt_bar * torch.tanh(self.transform_z(z) + i_z)
        return y, z


class ReferenceLEM(nn.Module):
    def __init__(self, ninp, nhid, nout, dt, cell_name="cell"):
        super().__init__()
        self.nhid, self.cell_name = nhid, cell_name
        setattr(self, cell_name, ReferenceLEMCell(ninp, nhid, dt))
        self.classifier = nn.Linear(nhid, nout)

    def forward(self, input):
        y = input.new_zeros(input.size(1), self.nhid)
        z = input.new_zeros(input.size(1), self.nhid)
        for x in input:
            y, z = getattr(self, self.cell_name)(x, y, z)
        return self.classifier(y)


@pytest.mark.parametrize("cell_name", ["cell", "rnn"])
def test_reference_checkpoint_loads_and_matches(cell_name):
    torch.manual_seed(6)
    reference = ReferenceLEM(2, 8, 3, dt=0.4, cell_name=cell_name)
    ours = lem.RNNModel("lem", 2, 8, 3, dt=0.4)
    lem.load_reference_state_dict(ours, reference.state_dict())
    x = torch.randn(10, 4, 2)
    torch.testing.assert_close(ours(x), reference(x))
    if cell_name == "cell":  # the reference's own key names load with no helper at all
        ours.load_state_dict(reference.state_dict())
    # The reference's cell state_dict loads into the bare layer with no key changes.
    layer = lem.LEM(2, 8, dt=0.4)
    layer.load_state_dict(getattr(reference, cell_name).state_dict())


@pytest.mark.parametrize("model", ["lem", "lstm", "gru"])
@pytest.mark.parametrize("head, shape", [("last", (4, 3)), ("every", (10, 4, 3))])
def test_models_and_heads(model, head, shape):
    net = lem.RNNModel(model, 2, 8, 3, head=head)
    assert net(torch.randn(10, 4, 2)).shape == shape


def test_unknown_model_raises():
    with pytest.raises(ValueError, match="lem"):
        lem.RNNModel("transformer", 2, 8, 3)


def test_out_of_memory_names_the_linear_and_its_size():
    with pytest.raises(RuntimeError, match=r"LEM\(hidden_size=1000000\): out of memory making hid2hid = "
                                           r"Linear\(1000000, 3000000\), a weight of 1.12e\+04 GiB"):
        lem.LEM(1, 10**6)
