"""The GPU tiers (lem/kernels/gpu.py) against the reference loop: outputs and every gradient, per-row
lengths and bias=False, autocast, torch.compile, what is kept for backward, and the fall to the
next tier when a kernel fails to launch.

Runs on CUDA tensors where a GPU is present. Without one, test_kernels.py runs this file in a fresh
process under TRITON_INTERPRET=1 (Triton's interpreter on CPU tensors; it has no bfloat16 tl.dot, so
the on-chip tier's half-precision path is checked there in float16, the same code).
"""
import contextlib
import os
import warnings

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

import lem  # noqa: E402
from lem import kernels  # noqa: E402
from lem.kernels import gpu, launch, onchip, stepwise  # noqa: E402
from asserts import assert_close_relative, assert_compiled_is_eager, assert_lengths_match, assert_matches, assert_packed_is_each_sequence_alone  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
TOL = 1e-5 if INTERPRETED else 1e-4  # relative to the largest entry; on a GPU summation orders differ more
pytestmark = [pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                 reason="needs a GPU, or TRITON_INTERPRET=1 (test_kernels.py runs it so)"),
              pytest.mark.filterwarnings("error:LEM GPU tier:RuntimeWarning")]  # a tier that fell back fails

CASES = [  # T, B, H, I, batch_first, with_state, state_dropout
    (3, 2, 5, 2, False, False, 0.0),
    (4, 17, 3, 1, True, True, 0.3),   # B = 17: a second, partial block of rows; batch_first; y0, z0; mask
    (1, 5, 20, 3, False, True, 0.4),  # T = 1; H = 20 is no power of two
    (5, 33, 64, 2, False, True, 0.2),  # H = 64, the largest on-chip size in float32; three blocks of rows
]


@pytest.fixture(autouse=True)
def no_failed_tiers(monkeypatch):
    monkeypatch.setattr(gpu, "_failed", {})


@pytest.mark.parametrize("tier", ["onchip", "stepwise"])
@pytest.mark.parametrize("case", CASES)
def test_tier_matches_reference(tier, case):
    assert_matches(tier, *case, device=DEVICE, tol=TOL)


def test_stepwise_at_h256():
    assert_matches("stepwise", 3, 4, 256, 2, with_state=True, state_dropout=0.3, device=DEVICE, tol=TOL)


@pytest.mark.parametrize("tier", ["onchip", "stepwise"])
def test_tier_without_bias(tier):
    assert_matches(tier, 4, 17, 20, 2, with_state=True, state_dropout=0.3, device=DEVICE, tol=TOL, bias=False)


@pytest.mark.parametrize("tier", ["onchip", "stepwise"])
@pytest.mark.parametrize("bias, with_mask", [(True, True), (False, False)])
def test_tier_per_row_lengths(tier, bias, with_mask):
    """Rows in no order of length, in two blocks of 16 (one partial), the last step reached by one row."""
    lengths = [3, 6, 1, 2, 5, 4, 6, 1, 2, 3, 5, 4, 2, 1, 3, 5, 4, 2, 3]
    assert_lengths_match(tier, 6, len(lengths), 20, 3, lengths, bias, with_mask, device=DEVICE, tol=TOL)


@pytest.mark.parametrize("tier", ["onchip", "stepwise"])
def test_tier_packed_batch_is_each_sequence_alone(tier):
    assert_packed_is_each_sequence_alone(tier, 2, True, True, enforce_sorted=False, bias=False, dtype=torch.float32,
                                         device=DEVICE)


@pytest.mark.parametrize("tier", ["onchip", "stepwise"])
def test_tier_under_torch_compile(tier):
    assert_compiled_is_eager(tier, DEVICE)


def test_activations_are_kept_only_when_a_backward_can_follow(monkeypatch):
    """As on the CPU path: grad mode on and some input requiring grad, not merely parameters that do."""
    calls = []

    def spy(tier, gemm, *args):
        calls.append(args[-1])  # keep
        return real(tier, gemm, *args)
    real = gpu.forward
    monkeypatch.setattr(gpu, "forward", spy)
    layer = lem.LEM(2, 16, backend="triton").to(DEVICE)
    x = torch.randn(5, 3, 2, device=DEVICE)
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer(x)
    layer.requires_grad_(False)
    layer(x)
    layer(x.requires_grad_())
    assert calls == [False, False, False, True]


def test_float64_runs_the_reference_loop():
    assert kernels.resolve("triton", DEVICE, 8, torch.float64) == "reference"
    layer = lem.LEM(2, 8, backend="triton").double().to(DEVICE)
    assert layer(torch.randn(3, 2, 2, dtype=torch.float64, device=DEVICE))[0].dtype == torch.float64


HALF = [("onchip", torch.float16), ("stepwise", torch.float16), ("stepwise", torch.bfloat16)]


@pytest.mark.parametrize("tier, dtype", HALF + ([] if INTERPRETED else [("onchip", torch.bfloat16)]))
def test_autocast(tier, dtype):
    """Under autocast: outputs in the autocast dtype (as nn.LSTM's), float32 parameter gradients, all
    close to the float32 reference loop within half precision."""
    torch.manual_seed(0)
    ref = lem.LEM(3, 24, dt=0.7, state_dropout=0.3, backend="reference").to(DEVICE)
    fused = lem.LEM(3, 24, dt=0.7, state_dropout=0.3, backend=tier).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(6, 18, 3, device=DEVICE, requires_grad=True)
    outs = {}
    with torch.autocast(DEVICE.type, dtype=dtype):
        assert kernels.resolve(tier, DEVICE, 24, x.dtype) == tier
    for name, layer, enabled in (("fused", fused, True), ("reference", ref, False)):
        torch.manual_seed(1)  # the same dropout mask
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=enabled):
            ys, (y, z) = layer(x)
        loss = ys.float().square().sum() + z.float().sum()
        outs[name] = [ys, z, *torch.autograd.grad(loss, [x, *layer.parameters()])]
    assert outs["fused"][0].dtype == outs["fused"][1].dtype == dtype
    assert all(g.dtype == torch.float32 for g in outs["fused"][2:])
    for a, b in zip(outs["fused"], outs["reference"]):
        assert_close_relative(a.float(), b, f"{tier} under {dtype} autocast", 5e-2 if dtype == torch.bfloat16 else 5e-3)


def _failing(real, kernels_that_fail):
    def launch(kernel, *args, **kwargs):
        if kernel in kernels_that_fail:
            raise OutOfResources(300000, 232448, "shared memory")
        return real(kernel, *args, **kwargs)
    return launch


def _reference_and_triton(H=12, tier="triton"):
    torch.manual_seed(0)
    ref = lem.LEM(2, H, dt=0.5, backend="reference").to(DEVICE)
    fused = lem.LEM(2, H, dt=0.5, backend=tier).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    return ref, fused, torch.randn(5, 3, 2, device=DEVICE)


def test_launch_failure_falls_to_the_next_tier_with_one_warning(monkeypatch):
    monkeypatch.setattr(onchip, "launch", _failing(onchip.launch, {onchip._forward}))
    ref, fused, x = _reference_and_triton()
    assert kernels.resolve("triton", DEVICE, 12, x.dtype) == "onchip"
    with pytest.warns(RuntimeWarning, match="tier 'onchip' failed.*OutOfResources"):
        ys = fused(x)[0]
    assert_close_relative(ys, ref(x)[0], "ys after the fall to stepwise", TOL)
    assert kernels.resolve("triton", DEVICE, 12, x.dtype) == "stepwise"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # one warning, not one per call
        fused(x)


def test_backward_failure_finishes_with_the_stepwise_backward(monkeypatch):
    monkeypatch.setattr(onchip, "launch", _failing(onchip.launch, {onchip._backward}))
    ref, fused, x = _reference_and_triton()
    ys = fused(x)[0]
    with pytest.warns(RuntimeWarning, match="tier 'onchip' failed"):
        ys.sum().backward()
    ref(x)[0].sum().backward()
    for (name, a), b in zip(fused.named_parameters(), ref.parameters()):
        assert_close_relative(a.grad, b.grad, name, TOL)


def test_when_every_tier_fails_the_reference_loop_runs(monkeypatch):
    monkeypatch.setattr(onchip, "launch", _failing(onchip.launch, {onchip._forward}))
    monkeypatch.setattr(stepwise, "launch", _failing(stepwise.launch, {stepwise._forward_z}))
    ref, fused, x = _reference_and_triton()
    with pytest.warns(RuntimeWarning) as caught:
        ys = fused(x)[0]
    tiers = [str(w.message).split(" failed")[0] for w in caught if "LEM GPU tier" in str(w.message)]
    assert tiers == ["LEM GPU tier 'onchip'", "LEM GPU tier 'stepwise'"]
    torch.testing.assert_close(ys, ref(x)[0], rtol=0, atol=0)
    assert kernels.resolve("triton", DEVICE, 12, x.dtype) == "reference"


@pytest.mark.skipif(INTERPRETED, reason="the experiments' sizes on a real GPU")
@pytest.mark.parametrize("T, B, H, I", [(20, 32, 16, 1), (20, 8, 32, 6), (20, 128, 128, 1), (20, 128, 256, 1),
                                        (10, 128, 1024, 200)])
def test_experiment_sizes_run_without_falling_back(T, B, H, I):
    """FitzHugh-Nagumo, EigenWorms, sMNIST H 128/256, PTB char (lem.tools.bench.CONFIGS), shortened: the tier
    the dispatcher picks must launch (the module's filter turns a fall into an error), in float32 and
    under bfloat16 autocast."""
    torch.manual_seed(0)
    ref = lem.LEM(I, H, backend="reference").to(DEVICE)
    fused = lem.LEM(I, H, backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, device=DEVICE)
    ys = fused(x)[0]
    ys.square().sum().backward()
    assert_close_relative(ys, ref(x)[0], f"H = {H}", 1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused(x)[0].float().square().sum().backward()


@pytest.mark.skipif(INTERPRETED, reason="asks this GPU")
def test_auto_picks_a_fused_tier_on_this_gpu():
    assert {kernels.resolve("auto", DEVICE, H, torch.float32) for H in range(1, 1025)} <= {"onchip", "stepwise"}


STICKY = "CUDA error: an illegal memory access was encountered"


def test_a_failed_device_is_no_tier_failure():
    """torch.AcceleratorError (a sticky asynchronous CUDA error) goes to the caller, as
    OutOfMemoryError does: the next tier and the reference loop would only fail on it too."""
    def broken(t):
        raise torch.AcceleratorError(STICKY)
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        gpu._first_that_launches("onchip", torch.float32, DEVICE, 12, broken)
    assert gpu._failed == {}


def _on_a_second_gpu(monkeypatch):
    """cuda:1 as the calls' device, with torch.cuda.device recording what it is entered with."""
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(gpu, "gpu_of", lambda d: gpu.INTERPRETER_GPU)
    return torch.device("cuda", 1), entered


def test_tiers_launch_on_their_tensors_device(monkeypatch):
    cuda1, entered = _on_a_second_gpu(monkeypatch)
    assert gpu._first_that_launches("onchip", torch.float32, cuda1, 12, lambda t: (t, list(entered))) == ("onchip", [cuda1])


def test_a_launch_error_from_a_failed_device_propagates(monkeypatch):
    """Triton reports a sticky error at its next launch as its own RuntimeError: synchronising the
    device then raises AcceleratorError, and no tier is marked failed."""
    cuda1, entered = _on_a_second_gpu(monkeypatch)
    synced = []

    def synchronize(d):
        synced.append(d)
        raise torch.AcceleratorError(STICKY)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)

    def launch_fails(t):
        raise RuntimeError(f"Triton Error [CUDA]: {STICKY}")
    with pytest.raises(torch.AcceleratorError):
        gpu._first_that_launches("onchip", torch.float32, cuda1, 12, launch_fails)
    assert synced == [cuda1] and gpu._failed == {}


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every ATen operator run inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket.__name__) + "." + func._overloadname)
        return func(*args, **(kwargs or {}))


def _stepwise_ops(T, backward):
    """The ATen operators of one stepwise loop of T steps (its Triton launches recorded, not run)."""
    torch.manual_seed(0)
    B, H = 3, 8
    t = lambda *shape: torch.randn(*shape, device=DEVICE)
    w_hh, w_tz, mask, lengths = t(3 * H, H), t(H, H), t(B, H), torch.tensor([T, 1, 2], device=DEVICE)
    ys, zs, acts, du = t(T + 1, B, H), t(T + 1, B, H), t(T, B, 4 * H), t(T, B, 4 * H)
    with launch.recording(), _Ops() as ops:
        if backward:
            stepwise.backward(t(T, B, H), acts, ys, zs, w_hh, w_tz, mask, lengths, du, t(B, H), t(B, H), 0.5)
        else:
            stepwise.forward(t(T, B, 4 * H), t(4 * H), w_hh, w_tz, mask, lengths, ys, zs, acts, 0.5)
    return ops.names


@pytest.mark.parametrize("backward", [False, True])
def test_the_stepwise_loop_allocates_nothing_and_never_waits_for_the_device(backward):
    """What a CUDA graph of the loop needs: per step two GEMMs into buffers made before the loop (and
    views), no allocation, nothing read back to the host (.item(), bool(): _local_scalar_dense)."""
    short, long = _stepwise_ops(3, backward), _stepwise_ops(7, backward)
    per_step = list(long)
    for name in short:
        per_step.remove(name)
    assert sorted(set(per_step)) == (["mm.out", "select.int", "slice.Tensor"] if backward else ["mm.out"]), per_step
    assert per_step.count("mm.out") == 2 * 4
    assert not [n for n in long if "local_scalar" in n or "_to_copy" in n or n.startswith("nonzero")]


class _FakeCUDA:
    """Stands for CUDA tensors in Graphs' look-ups: a device, an address, a shape."""
    device = torch.device("cuda")

    def __init__(self, address, shape=(2, 3)):
        self.address, self.shape = address, torch.Size(shape)

    def data_ptr(self):
        return self.address

    def stride(self):
        return (self.shape[1], 1)

    dtype = torch.float32


def _fake_graphs(monkeypatch, capture_fails=False):
    """torch.cuda's graph API on CPU: a 'capture' records the loop's calls, a replay repeats them."""
    state = {"capturing": False}

    class Graph:
        def replay(self):
            for fn, args in self.calls:
                fn(*args, replayed=True)

    @contextlib.contextmanager
    def graph(g):
        if capture_fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        state["capturing"], g.calls, state["graph"] = True, [], g
        yield
        state["capturing"] = False
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    runs = []

    def loop(x, dt, replayed=False):
        if state["capturing"] and not replayed:
            state["graph"].calls.append((loop, (x, dt)))
        else:
            runs.append(("replay" if replayed else "eager", x.address, dt))
    return stepwise.Graphs(size=2), loop, runs


def test_a_loop_is_captured_on_its_second_call_and_replayed_after(monkeypatch):
    graphs, loop, runs = _fake_graphs(monkeypatch)
    for address in (1, 1, 1, 2, 1):
        graphs.run("forward", loop, (_FakeCUDA(address),), 0.5)
    assert runs == [("eager", 1, 0.5), ("replay", 1, 0.5), ("replay", 1, 0.5), ("eager", 2, 0.5), ("replay", 1, 0.5)]
    assert (graphs.captures, graphs.replays) == (1, 3)
    graphs.run("forward", loop, (_FakeCUDA(1, (3, 2)),), 0.5)  # another shape at the same address
    graphs.run("forward", loop, (_FakeCUDA(1),), 0.7)  # another dt
    assert runs[-2:] == [("eager", 1, 0.5), ("eager", 1, 0.7)]


def test_a_failed_capture_warns_once_and_launches_eagerly(monkeypatch):
    graphs, loop, runs = _fake_graphs(monkeypatch, capture_fails=True)
    graphs.run("forward", loop, (_FakeCUDA(1),), 0.5)
    with pytest.warns(RuntimeWarning, match="could not capture its loop in a CUDA graph"):
        graphs.run("forward", loop, (_FakeCUDA(1),), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphs.run("forward", loop, (_FakeCUDA(1),), 0.5)
    assert runs == [("eager", 1, 0.5)] * 3 and not graphs.enabled


@pytest.mark.skipif(INTERPRETED, reason="CUDA graphs on a real GPU")
def test_replayed_stepwise_graphs_give_the_reference_loop_s_results(monkeypatch):
    """The same layer and input five times (a training loop's addresses repeat): a call captures
    when its tensors are where the call before had them, the next replays; every call's outputs and
    gradients match the reference loop."""
    monkeypatch.setattr(stepwise, "GRAPHS", stepwise.Graphs())
    ref, fused, x = _reference_and_triton(H=40, tier="stepwise")
    x = x.repeat(1, 6, 1).requires_grad_()
    for _ in range(5):
        ys, (y, z) = fused(x)
        got = [ys, z, *torch.autograd.grad(ys.square().sum() + z.sum(), [x, *fused.parameters()])]
        ys, (y, z) = ref(x)
        want = [ys, z, *torch.autograd.grad(ys.square().sum() + z.sum(), [x, *ref.parameters()])]
        for a, b in zip(got, want):
            assert_close_relative(a, b, "stepwise with CUDA graphs", TOL)
        del ys, y, z, got, want
    assert stepwise.GRAPHS.replays > 0, "the calls' tensors never came back to the same addresses"


@pytest.fixture
def gates_streamed(monkeypatch):
    """The on-chip tier with its gate blocks read from L2 every step, as where only two blocks fit
    (float32 H 128 on A100/H100), at any size."""
    monkeypatch.setattr(onchip, "stream_gates", lambda H, dtype, limit: True)
    assert kernels.resolve("onchip", DEVICE, 20, torch.float32) == "onchip"


@pytest.mark.parametrize("case", CASES + [(3, 18, 48, 2, False, True, 0.3)])  # H 48: chunks of 16 and a padded tile
def test_onchip_with_streamed_gates_matches_reference(gates_streamed, case):
    assert_matches("onchip", *case, device=DEVICE, tol=TOL)


def test_onchip_with_streamed_gates_per_row_lengths_and_no_bias(gates_streamed):
    lengths = [3, 6, 1, 2, 5, 4, 6, 1, 2, 3, 5, 4, 2, 1, 3, 5, 4, 2, 3]
    assert_lengths_match("onchip", 6, len(lengths), 20, 3, lengths, False, True, device=DEVICE, tol=TOL)


def test_onchip_with_streamed_gates_under_autocast(gates_streamed):
    test_autocast("onchip", torch.float16)


def test_the_gates_stream_only_where_all_four_blocks_do_not_fit():
    """float32 H 128 on A100 and H100 (the experiments' default size), half precision H 128 on the
    RTX cards; the four blocks wherever they fit."""
    gpus = {80: gpu.GPU(80, 166912), 86: gpu.GPU(86, 101376), 90: gpu.GPU(90, 232448)}
    f32, bf16 = torch.float32, torch.bfloat16
    assert onchip.stream_gates(64, f32, gpus[86].shared_memory) is False
    assert onchip.stream_gates(128, bf16, gpus[80].shared_memory) is False
    assert onchip.stream_gates(128, f32, gpus[80].shared_memory) is True
    assert onchip.stream_gates(128, f32, gpus[90].shared_memory) is True
    assert onchip.stream_gates(128, bf16, gpus[86].shared_memory) is True
    assert onchip.stream_gates(128, f32, gpus[86].shared_memory) is None
    assert onchip.stream_gates(256, bf16, gpus[90].shared_memory) is None
