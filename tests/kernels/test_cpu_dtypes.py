"""bfloat16 and float16 on the fused CPU backend: modules in those dtypes and torch.autocast run fused
(mixed precision: products on low-precision inputs, float32 state, gates and sums), give outputs in
the dtypes nn.LSTM gives, values close to the reference loop in the same dtype, and gradients in the
parameters' dtypes."""
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import lem
from lem import kernels
from lem.kernels import cpu

LOW = (torch.bfloat16, torch.float16)
# max |fused - reference| allowed, relative to the largest |reference| of each tensor: a few units
# of the dtype's rounding (2^-8 for bfloat16, 2^-11 for float16) over 12 steps
TOLERANCE = {torch.bfloat16: 4e-2, torch.float16: 8e-3}
T, B, I = 12, 5, 3
LENGTHS = torch.tensor([12, 9, 7, 7, 2])
CASES = {
    "one layer": dict(),
    "2 layers, bidirectional": dict(num_layers=2, bidirectional=True),
    "state and state dropout": dict(state=True, state_dropout=0.3),
    "lengths, bidirectional, no bias": dict(bias=False, bidirectional=True, packed=True),
}


class ForwardSpy:
    """Stands in for the compiled extension and records the products' dtype of every forward call."""

    def __init__(self, module):
        self.module, self.gemms = module, []

    def forward(self, *args):
        self.gemms.append(args[13])
        return self.module.forward(*args)

    def __getattr__(self, name):
        return getattr(self.module, name)


def run(backend, dtype, autocast, H, num_layers=1, bidirectional=False, state=False, state_dropout=0.0, bias=True,
        packed=False, double=False):
    """(output, y_n, z_n) and the gradients {name: tensor} of a weighted loss over all three, for a LEM
    in `dtype` (autocast: float32 under torch.autocast(dtype)); double: the same weights in float64."""
    torch.manual_seed(0)
    m = lem.LEM(I, H, num_layers, bias=bias, bidirectional=bidirectional, dt=0.5, state_dropout=state_dropout,
                backend=backend)
    if not autocast:
        m = m.to(dtype)
    x_dtype = torch.float32 if autocast else dtype
    if double:
        m, x_dtype = m.double(), torch.float64
    x = torch.randn(T, B, I).to(x_dtype).requires_grad_()
    D = 2 if bidirectional else 1
    s = tuple(torch.randn(D * num_layers, B, H).to(x_dtype).requires_grad_() for _ in range(2)) if state else None
    torch.manual_seed(1)  # the same state-dropout masks in every run
    with torch.autocast("cpu", dtype, enabled=autocast and not double):
        out, (y, z) = m(pack_padded_sequence(x, LENGTHS) if packed else x, s)
    out = out.data if packed else out
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(k)) for k, t in enumerate((out, y, z))]
    sum((t.double() * w).sum() for t, w in zip((out, y, z), weights)).backward()
    grads = {name: p.grad for name, p in m.named_parameters()}
    grads.update({"x": x.grad, **({"y0": s[0].grad, "z0": s[1].grad} if state else {})})
    return (out, y, z), grads


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-3)).item()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("H", [16, 80])  # the per-row strategy, per-step GEMMs
@pytest.mark.parametrize("autocast", [False, True], ids=["module", "autocast"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_runs_fused_close_to_the_reference_loop(monkeypatch, dtype, autocast, H, case):
    assert kernels.resolve("cpp", torch.device("cpu"), H, dtype) == "cpp", "the fused path did not build"
    spy = ForwardSpy(cpu.load())
    monkeypatch.setattr(cpu, "_module", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback (it warns), no other complaint
        outputs, grads = run("cpp", dtype, autocast, H, **CASES[case])
    layers = CASES[case].get("num_layers", 1) * (2 if CASES[case].get("bidirectional") else 1)
    assert spy.gemms == [dtype] * layers, "not every layer and direction ran fused in mixed precision"
    ref_outputs, ref_grads = run("reference", dtype, autocast, H, **CASES[case])
    for name, a, b in zip(("output", "y_n", "z_n"), outputs, ref_outputs):
        assert a.dtype == b.dtype == dtype, name
        assert relative_error(a, b) < TOLERANCE[dtype], name
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g.dtype == ref_grads[name].dtype, f"d {name} in {g.dtype}"
        assert relative_error(g, ref_grads[name]) < TOLERANCE[dtype], f"d {name}"


@pytest.mark.parametrize("H", [16, 80])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_float32_state_is_at_least_as_accurate_as_the_reference_loop_in_low_precision(dtype, H):
    """Against float64 on the same weights: the fused path keeps state, gates and sums in float32,
    the reference loop in a low-precision module does them in its dtype."""
    truth, true_grads = run("reference", dtype, False, H, state=True, double=True)
    fused, grads = run("cpp", dtype, False, H, state=True)
    ref, ref_grads = run("reference", dtype, False, H, state=True)
    for a, b, t in zip(fused, ref, truth):
        assert relative_error(a, t) <= relative_error(b, t) + 2 ** -10
    for name in true_grads:
        assert relative_error(grads[name], true_grads[name]) <= 1.5 * relative_error(ref_grads[name], true_grads[name]) + 2 ** -10, name


@pytest.mark.parametrize("autocast, x_dtype", [(None, torch.bfloat16), (None, torch.float16),
                                               (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16)])
def test_output_dtypes_are_nn_lstms(autocast, x_dtype):
    """In every setting nn.LSTM runs in on CPU (it fails under an float16 autocast on a float32 input)."""
    x = torch.randn(T, B, I, dtype=x_dtype)
    dtypes = []
    for m in (nn.LSTM(I, 16, 2, bidirectional=True), lem.LEM(I, 16, 2, bidirectional=True, backend="cpp"),
              lem.LEM(I, 80, 2, bidirectional=True, backend="cpp")):
        m = m if autocast else m.to(x_dtype)
        with torch.autocast("cpu", autocast or torch.bfloat16, enabled=autocast is not None):
            out, (h, c) = m(x)
        dtypes.append((out.dtype, h.dtype, c.dtype))
    assert dtypes[1] == dtypes[2] == dtypes[0]


def test_float32_and_float64_still_run_without_mixed_precision(monkeypatch):
    spy = ForwardSpy(cpu.load())
    monkeypatch.setattr(cpu, "_module", spy)
    for dtype in (torch.float32, torch.float64):
        out, _ = lem.LEM(I, 80, backend="cpp").to(dtype)(torch.randn(T, B, I, dtype=dtype))
        assert out.dtype == dtype
    assert spy.gemms == [None, None]
