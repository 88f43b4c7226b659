"""The PyTorch contract of lem.LEM, the same checks on every backend: derivatives of first and second
order (gradcheck, gradgradcheck, batched gradients), what hangs on the inner Linears (hooks, pruning,
weight and spectral norms, parametrizations, quantized and subclassed Linears), the meta device,
torch.func, pickling and copies, state_dict, export, low-precision dtypes.

Each check compares a backend with the reference loop, or asserts a clear error where a backend
cannot serve. The GPU tiers run on CUDA tensors where a GPU is present; without one,
test_gpu_tiers_under_the_interpreter runs their rows in a fresh process under TRITON_INTERPRET=1
(Triton's interpreter on CPU tensors; it must be set before Triton compiles the kernels' decorators).
"""
import copy
import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.autograd import forward_ad, gradcheck, gradgradcheck
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parametrize, prune
from torch.nn.utils.rnn import pack_padded_sequence

import lem
from helpers import train_env

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
GPU_TIERS = ("onchip", "stepwise")
GPU_HERE = INTERPRETED or torch.cuda.is_available()
BACKENDS = ["reference", "cpp", *(pytest.param(t, marks=pytest.mark.skipif(not GPU_HERE, reason="needs a GPU or "
                                  "TRITON_INTERPRET=1 (test_gpu_tiers_under_the_interpreter runs it so)"))
                                  for t in GPU_TIERS)]
FLOAT64 = ["reference", "cpp"]  # the GPU tiers take no float64 (it runs the reference loop there)
I, H, T, B = 2, 3, 4, 2
pytestmark = pytest.mark.filterwarnings("error:LEM GPU tier:RuntimeWarning")  # a tier that fell back fails


@pytest.fixture
def loops_run(monkeypatch):
    """A list that gets one entry per run of LEM's reference loop (the module path, not the fused
    backends' recompute): empty after a call the fused path ran."""
    module = sys.modules[lem.LEM.__module__]
    calls, real = [], module.time_loop

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, "time_loop", counted)
    return calls


def ran_fused(backend, loops_run):
    return backend == "reference" or not loops_run


def device_of(backend):
    return torch.device("cuda" if backend in GPU_TIERS and not INTERPRETED else "cpu")


def pair(backend, dtype=torch.float32, setup=None, **kwargs):
    """A reference layer and one on `backend` with its weights, both passed through setup(layer)
    first (so that what setup adds starts equal too)."""
    layers = []
    for name in ("reference", backend):
        torch.manual_seed(0)
        layer = lem.LEM(I, H, dt=0.7, backend=name, **kwargs).to(device_of(backend), dtype)
        if setup is not None:
            setup(layer)
        layers.append(layer)
    layers[1].load_state_dict(layers[0].state_dict())
    return layers


def inputs(backend, dtype=torch.float32, steps=T):
    g = torch.Generator().manual_seed(3)
    x, y0, z0 = torch.randn(steps, B, I, generator=g), torch.randn(1, B, H, generator=g), torch.randn(1, B, H, generator=g)
    return [t.to(device_of(backend), dtype).requires_grad_() for t in (x, y0, z0)]


def as_function(layer):
    """(x, y0, z0, *parameters) -> (ys, y_T, z_T), for gradcheck."""
    names = [n for n, _ in layer.named_parameters()]

    def f(x, y0, z0, *params):
        ys, (y, z) = functional_call(layer, dict(zip(names, params)), (x, (y0, z0)))
        return ys, y, z
    return f


def loss_of(outputs):
    g = torch.Generator().manual_seed(5)
    return sum((o * torch.randn(o.shape, generator=g).to(o)).sum() for o in outputs)


def first_and_second_derivatives(layer, args):
    """The gradient of a loss of all outputs w.r.t. args, and the gradient of a loss of that gradient."""
    torch.manual_seed(1)  # one state-dropout mask for every backend
    first = torch.autograd.grad(loss_of(as_function(layer)(*args)), args, create_graph=True)
    second = torch.autograd.grad(loss_of(first), args)
    return [*first, *second]


def assert_all_close(got, want, what, rtol=1e-4):
    for i, (a, b) in enumerate(zip(got, want)):
        scale = b.abs().max().item() or 1.0
        err = (a.float() - b.float()).abs().max().item() / scale
        assert err <= rtol, f"{what}: entry {i} differs from the reference by {err:.2e} (relative)"


# ----- derivatives -----

@pytest.mark.parametrize("backend", FLOAT64)
def test_gradcheck_and_gradgradcheck_in_float64(backend):
    _, layer = pair(backend, torch.float64)
    args = (*inputs(backend, torch.float64), *layer.parameters())
    assert gradcheck(as_function(layer), args, check_batched_grad=True)
    assert gradgradcheck(as_function(layer), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_second_derivatives_are_the_reference_loops(backend, bias, loops_run):
    """float32, the GPU tiers' precision: create_graph=True, then the gradient of that gradient."""
    ref, layer = pair(backend, bias=bias, state_dropout=0.3)
    args = inputs(backend)
    got = first_and_second_derivatives(layer, [*args, *layer.parameters()])
    assert ran_fused(backend, loops_run)
    want = first_and_second_derivatives(ref, [*args, *ref.parameters()])
    assert all(g is not None for g in got)
    assert_all_close(got, want, f"{backend}: first and second derivatives")


def _packed_bidirectional(layer):
    """x -> the final states of the layer on a PackedSequence of x's rows with lengths T and 2."""
    def f(x):
        y, z = layer(pack_padded_sequence(x, torch.tensor([T, 2]), enforce_sorted=False))[1]
        return y, z
    return f


@pytest.mark.parametrize("backend", FLOAT64)
def test_gradgradcheck_packed_and_bidirectional(backend):
    _, layer = pair(backend, torch.float64, bidirectional=True)
    assert gradgradcheck(_packed_bidirectional(layer), inputs(backend, torch.float64)[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_packed_and_bidirectional(backend, loops_run):
    results = []
    for layer in pair(backend, bidirectional=True):
        loops_run.clear()
        x = inputs(backend)[0]
        first = torch.autograd.grad(loss_of(_packed_bidirectional(layer)(x)), [x, *layer.parameters()], create_graph=True)
        results.append([*first, *torch.autograd.grad(loss_of(first), [x, *layer.parameters()])])
    assert ran_fused(backend, loops_run)
    assert_all_close(results[1], results[0], f"{backend}: second derivatives, packed and bidirectional")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_gradients_are_the_reference_loops(backend):
    """autograd.grad(is_grads_batched=True), what gradcheck's check_batched_grad and jacobians use."""
    results = []
    for layer in pair(backend):
        x = inputs(backend)[0]
        ys = layer(x)[0]
        v = torch.randn((3, *ys.shape), generator=torch.Generator().manual_seed(4)).to(ys)
        results.append(torch.autograd.grad(ys, [x, *layer.parameters()], v, is_grads_batched=True))
    assert_all_close(results[1], results[0], f"{backend}: batched gradients")


# ----- what hangs on the inner Linears -----

class Halved(nn.Module):
    """A parametrization: the weight used is half the one stored."""

    def forward(self, w):
        return 0.5 * w


class WithOwnForward(nn.Linear):
    def forward(self, v):
        return super().forward(v) + 0.1 * v.sum(-1, keepdim=True)


class SameForward(nn.Linear):
    pass


def _subclass(layer, cls):
    old = layer.hid2hid
    new = cls(old.in_features, old.out_features, device=old.weight.device, dtype=old.weight.dtype)
    new.load_state_dict(old.state_dict())
    layer.hid2hid = new


def _quantized(layer):
    torch.ao.quantization.quantize_dynamic(layer, {nn.Linear}, inplace=True)


ON_LINEARS = {  # name: (setup, whether the fused path may run it)
    "pruning": (lambda m: prune.l1_unstructured(m.hid2hid, "weight", amount=0.4), True),
    "old weight_norm": (lambda m: nn.utils.weight_norm(m.transform_z), True),
    "parametrization": (lambda m: parametrize.register_parametrization(m.hid2hid, "weight", Halved()), True),
    "orthogonal": (lambda m: nn.utils.parametrizations.orthogonal(m.transform_z), True),
    "subclass, same forward": (lambda m: _subclass(m, SameForward), True),
    "old spectral_norm": (lambda m: nn.utils.spectral_norm(m.hid2hid), False),
    "forward pre-hook": (lambda m: m.hid2hid.register_forward_pre_hook(lambda mod, args: (args[0] * 0.9,)), False),
    "forward hook": (lambda m: m.transform_z.register_forward_hook(lambda mod, args, out: out * 1.1), False),
    "backward hook": (lambda m: m.hid2hid.register_full_backward_hook(lambda mod, gi, go: None), False),
    "subclass, own forward": (lambda m: _subclass(m, WithOwnForward), False),
    "quantize_dynamic": (_quantized, False),
}


def _train_twice(layer, x):
    """Two SGD steps, then the outputs and gradients of a third call: a stale weight shows there.
    A layer without parameters (all Linears quantized): the outputs of one call."""
    params = list(layer.parameters())
    if not params:
        return [layer(x)[0]]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        ys = layer(x)[0]
        loss_of([ys]).backward()
        opt.step()
    return [ys.detach(), *(p.grad for p in params)]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                            "ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", list(ON_LINEARS))
def test_what_hangs_on_the_inner_linears_is_honoured(backend, what, loops_run):
    """Every step of training matches the reference loop with the same thing on its Linears; the
    fused path runs it where it can, else the layer runs the reference loop with one warning."""
    setup, fusable = ON_LINEARS[what]
    if what == "quantize_dynamic" and device_of(backend).type != "cpu":
        pytest.skip("dynamically quantized Linears run on the CPU")
    ref, layer = pair(backend, setup=setup)
    x = inputs(backend)[0].detach()
    want = _train_twice(ref, x)
    loops_run.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        got = _train_twice(layer, x)
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "reference' loop" in str(w.message)]
    assert len(ours) == (0 if fusable or backend == "reference" else 1), [str(w.message) for w in ours]
    assert ran_fused(backend, loops_run) == (fusable or backend == "reference")
    assert_all_close(got, want, f"{backend} with {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_fire_at_every_step_and_global_hooks_count(backend):
    _, layer = pair(backend)
    calls = []
    layer.hid2hid.register_forward_hook(lambda *args: calls.append("local"))
    handle = nn.modules.module.register_module_forward_hook(lambda mod, *args: calls.append(type(mod).__name__))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            layer(inputs(backend)[0])
    finally:
        handle.remove()
    assert calls.count("local") == T and calls.count("Linear") == 2 * T + 1  # hid2hid, transform_z per step; inp2hid once
    assert calls.count("LEM") == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_spectral_norm_parametrization_in_eval_mode(backend):
    """parametrizations.spectral_norm: one weight per call (in training, its power iteration runs once
    per call on the fused path, once per step on the reference loop)."""
    ref, layer = pair(backend, setup=lambda m: nn.utils.parametrizations.spectral_norm(m.hid2hid))
    args = inputs(backend)
    got, want = ([m.eval()(args[0])[0], *first_and_second_derivatives(m, [*args, *m.parameters()])] for m in (layer, ref))
    assert_all_close(got, want, f"{backend} with spectral_norm")


# ----- meta, torch.func, copies, export -----

@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_device_gives_the_shapes(backend):
    with torch.device("meta"):
        layer = lem.LEM(I, H, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
        ys, (y, z) = layer(torch.empty(B, T, I))
    assert ys.shape == (B, T, 2 * H) and y.shape == z.shape == (4, B, H) and ys.is_meta


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_and_forward_mode(backend):
    ref, layer = pair(backend)
    x = inputs(backend)[0].detach()
    results = []
    for m in (ref, layer):
        params = {n: p.detach() for n, p in m.named_parameters()}
        loss = lambda p, x: functional_call(m, p, (x,))[0].square().sum()
        grads = grad(loss, argnums=(0, 1))(params, x)
        ensemble = {n: torch.stack([p, 1.1 * p]) for n, p in params.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # vmap runs the reference loop, warned
            per_model = vmap(lambda p: functional_call(m, p, (x,))[0])(ensemble)
            per_row = vmap(lambda row: m(row)[0], in_dims=1, out_dims=1)(x)
        jacobian = torch.func.jacrev(lambda x: m(x)[1][1].sum(0))(x)  # of z_T summed over the batch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # forward mode runs the reference loop, warned
            tangent = torch.func.jvp(lambda x: m(x)[0], (x,), (torch.ones_like(x),))[1]
            hessian = torch.func.hessian(lambda x: m(x)[0].square().sum())(x[:, :1])
            with forward_ad.dual_level():
                dual = forward_ad.unpack_dual(m(forward_ad.make_dual(x, 0.5 * x))[0]).tangent
        results.append([*grads[0].values(), grads[1], jacobian, per_model, per_row, tangent, hessian, dual])
    assert_all_close(results[1], results[0], f"{backend} under torch.func")
    assert_all_close(results[1][-4:-3], [layer(x)[0]], f"{backend}: vmap over the rows vs one batch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickle_deepcopy_and_state_dict_round_trip(backend):
    _, layer = pair(backend, num_layers=2, state_dropout=0.2)
    x = inputs(backend)[0].detach()
    layer.eval()
    fresh = lem.LEM(I, H, dt=0.7, num_layers=2, state_dropout=0.2, backend=backend).to(device_of(backend)).eval()
    fresh.load_state_dict(layer.state_dict())
    copies = [pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), fresh]
    want = layer(x)[0]
    for c in copies:
        assert c.backend == backend and c.state_dropout == 0.2
        torch.testing.assert_close(c(x)[0], want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_and_legacy_onnx_refuse_with_a_clear_error(backend):
    _, layer = pair(backend)
    x = inputs(backend)[0].detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's own notices
        with pytest.raises(RuntimeError, match="torch.jit.trace.*torch.export.export"):
            torch.jit.trace(layer, (x,))
        with pytest.raises(RuntimeError, match="torch.onnx.export with dynamo=False.*torch.export.export"):
            torch.onnx.export(layer, (x,), io.BytesIO(), dynamo=False)
    with pytest.raises(RuntimeError, match="torch.jit.script.*torch.export.export"):
        torch.jit.script(layer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_matches_eager(backend):
    """Fused backends: any sequence length (the time loop is one operator); reference: the exported one."""
    _, layer = pair(backend)
    x = inputs(backend)[0].detach()
    dynamic = backend != "reference"
    shapes = ({0: torch.export.Dim("T", min=2)},) if dynamic else None
    exported = torch.export.export(layer, (x,), dynamic_shapes=shapes).module()
    other = inputs(backend, steps=7 if dynamic else T)[0].detach() * 0.5
    assert_all_close([exported(other)[0]], [layer(other)[0]], f"{backend}: exported", 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_export_never_lies(backend, tmp_path):
    """torch.onnx.export's default (dynamo) exporter: 'reference' at the traced length, which
    onnxruntime holds to; the fused backends' operators have no ONNX translation and fail to convert."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    _, layer = pair(backend)
    x = inputs(backend)[0].detach()
    path = tmp_path / "lem.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend != "reference":
            with pytest.raises(Exception, match="Failed to convert"):
                torch.onnx.export(layer.eval(), (x,), str(path))
            return
        torch.onnx.export(layer.eval(), (x,), str(path))
    session = ort.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    other = 0.5 * x
    assert_all_close([torch.from_numpy(session.run(None, {name: other.numpy()})[0])], [layer(other)[0]], "onnx", 1e-5)
    with pytest.raises(Exception, match="Got invalid dimensions"):
        session.run(None, {name: torch.randn(T + 3, B, I).numpy()})


# ----- low-precision dtypes -----

LOW = [torch.bfloat16, torch.float16]


def _low_rows():
    for b in BACKENDS:
        name = b.values[0] if hasattr(b, "values") else b
        for dtype in LOW:
            marks = list(b.marks) if hasattr(b, "marks") else []
            if name == "onchip" and dtype == torch.bfloat16 and INTERPRETED:
                continue  # the interpreter has no bfloat16 tl.dot (test_gpu_tiers.py checks float16 there)
            yield pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend, dtype", list(_low_rows()))
@pytest.mark.parametrize("how", ["module", "autocast, 2 layers"])
def test_low_precision_runs_close_to_float32(backend, dtype, how):
    """A bf16/fp16 module, or float32 under torch.autocast: outputs in that dtype (as nn.LSTM's),
    close to the float32 reference within its precision, float gradients for every parameter."""
    ref, layer = pair(backend, num_layers=1 if how == "module" else 2)
    x = inputs(backend)[0].detach()
    want = ref(x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fused backend must not fall back to the reference loop
        if how == "module":
            ys = layer.to(dtype)(x.to(dtype))[0]
        else:
            with torch.autocast(device_of(backend).type, dtype=dtype):
                ys = layer(x)[0]
        ys.float().square().sum().backward()
    assert ys.dtype == dtype and all(p.grad is not None for p in layer.parameters())
    assert_all_close([ys], [want], f"{backend} in {dtype}", 3e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("backend, dtype", list(_low_rows()))
def test_second_derivatives_and_torch_func_under_autocast(backend, dtype):
    """Under torch.autocast layer 2 takes a low-precision input from layer 1: the recompute that
    second derivatives and torch.func go through must run its products as the forward did."""
    results = []
    for layer in pair(backend, num_layers=2):
        x = inputs(backend)[0].detach().requires_grad_()
        params = dict(layer.named_parameters())
        with torch.autocast(device_of(backend).type, dtype=dtype):
            first = torch.autograd.grad(layer(x)[0].float().square().sum(), [x, *params.values()], create_graph=True)
            second = torch.autograd.grad(sum(g.float().square().sum() for g in first), [x, *params.values()])
            func = grad(lambda p: functional_call(layer, p, (x,))[0].float().square().sum())(params)
        results.append([*first, *second, *func.values()])
    assert_all_close(results[1], results[0], f"{backend} under {dtype} autocast", 5e-2 if dtype == torch.bfloat16 else 1e-2)


def test_gpu_tiers_under_the_interpreter():
    """This module's GPU-tier rows on CPU tensors under Triton's interpreter, in a fresh process."""
    if GPU_HERE:
        pytest.skip("the GPU rows run in this process")
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", " or ".join(GPU_TIERS),
                           Path(__file__).name], cwd=Path(__file__).parent, env=train_env(TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]
