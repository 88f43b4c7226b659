"""The fused LEM backends against the reference loop (docs/paper.md §1): outputs and every gradient."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lem
from lem import kernels
from lem.tools import bench
from lem.kernels import cpu
from helpers import train_env
from asserts import assert_close_relative, assert_lengths_match, assert_matches, run


@pytest.mark.parametrize("T, B, H, I, batch_first, with_state, state_dropout", [
    (50, 8, 16, 1, False, False, 0.0),   # per-row strategy, H fixed at compile time, full blocks of rows
    (30, 7, 17, 3, True, True, 0.3),     # H not a power of two, leftover rows, batch_first, y0/z0, mask
    (1, 1, 5, 2, False, True, 0.0),      # T = 1, B = 1
    (12, 1, 33, 4, True, False, 0.5),    # B = 1
    (9, 5, 32, 2, True, True, 0.4),      # H = 32 fixed at compile time, y0/z0, mask
    (25, 9, 40, 2, False, False, 0.0),   # mat-vec tiles of every width (3H = 120 = 48 + 48 + 16 + 8)
    (20, 6, 70, 3, False, True, 0.2),    # per-step GEMM strategy (H > 64)
])
def test_fused_cpu_matches_reference(T, B, H, I, batch_first, with_state, state_dropout):
    assert_matches("cpp", T, B, H, I, batch_first, with_state, state_dropout)


@pytest.mark.parametrize("H", [16, 17, 70])  # per-row strategy with H fixed and at run time; per-step GEMMs
def test_fused_cpu_without_bias(H):
    assert_matches("cpp", 6, 5, H, 3, with_state=True, state_dropout=0.3, bias=False)


@pytest.mark.parametrize("T, H, lengths, bias, with_mask", [
    (9, 16, [9, 1, 4, 9, 2, 7, 3, 5, 8, 6, 2], True, True),  # per-row: a block of 8 (or 4) rows, leftover rows
    (6, 20, [3, 5, 1, 2, 4], False, False),                  # H at run time; no row runs all T steps
    (9, 70, [4, 9, 1, 9, 6, 2, 7], True, True),              # per-step GEMMs over the rows not yet ended
    (6, 70, [2, 2, 5, 1], False, False),                     # ... and steps where every row has ended
])
def test_fused_cpu_per_row_lengths(T, H, lengths, bias, with_mask):
    assert_lengths_match("cpp", T, len(lengths), H, 3, lengths, bias, with_mask)


def test_fused_cpu_float64_and_eval_mode():
    torch.manual_seed(0)
    ref = lem.LEM(2, 9, dt=0.3, state_dropout=0.4, backend="reference").double().eval()
    fused = lem.LEM(2, 9, dt=0.3, state_dropout=0.4, backend="cpp").double().eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(15, 3, 2, dtype=torch.float64, requires_grad=True)
    for a, b in zip(run(fused, x, None), run(ref, x, None)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the inference path keeps no per-step z
        torch.testing.assert_close(fused(x)[1][1], ref(x)[1][1], rtol=1e-12, atol=1e-12)


class KernelSpy:
    """Stands in for the compiled extension: records, per forward call, whether it was asked to keep
    activations and whether it returned any (zs and acts are empty tensors when it kept none)."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def forward(self, *args):
        out = self.module.forward(*args)
        self.calls.append((args[12], out[2].numel() > 0 and out[3].numel() > 0))  # keep, after x ... dt
        return out

    def __getattr__(self, name):
        return getattr(self.module, name)


@pytest.mark.parametrize("T, B, H, I, batch_first, with_state, state_dropout", [
    (40, 37, 16, 1, False, False, 0.0),  # per-row strategy: blocks of 8 rows, 5 leftover rows
    (30, 7, 32, 6, True, True, 0.3),     # blocks of 4 rows (too few rows for 8), batch_first, y0/z0, mask
    (25, 9, 40, 3, False, True, 0.0),    # H not fixed at compile time
    (250, 9, 70, 5, False, True, 0.2),   # per-step GEMMs; the input projection in two blocks of steps
])
def test_forward_only_is_the_training_forward_bit_for_bit(monkeypatch, T, B, H, I, batch_first, with_state, state_dropout):
    spy = KernelSpy(cpu.load())
    monkeypatch.setattr(cpu, "_module", spy)
    torch.manual_seed(0)
    layer = lem.LEM(I, H, dt=0.6, batch_first=batch_first, state_dropout=state_dropout, backend="cpp")
    x = torch.randn((B, T, I) if batch_first else (T, B, I))
    state = (torch.randn(1, B, H), torch.randn(1, B, H)) if with_state else None
    torch.manual_seed(1)  # the same state-dropout mask in both calls
    ys, (y, z) = layer(x, state)  # grad mode on, the parameters require grad: keeps activations
    torch.manual_seed(1)
    with torch.no_grad():
        ys_inf, (y_inf, z_inf) = layer(x, state)
    assert spy.calls == [(True, True), (False, False)]
    for name, a, b in (("ys", ys, ys_inf), ("y_T", y, y_inf), ("z_T", z, z_inf)):
        assert torch.equal(a, b), f"{name} of the forward-only path differs from the training forward"


def test_activations_are_kept_only_when_a_backward_can_follow(monkeypatch):
    spy = KernelSpy(cpu.load())
    monkeypatch.setattr(cpu, "_module", spy)
    layer = lem.LEM(2, 16, backend="cpp")
    x = torch.randn(5, 3, 2)
    with torch.no_grad():
        layer(x)  # the parameters require grad, grad mode is off
    with torch.inference_mode():
        layer(x)
    layer.requires_grad_(False)
    layer(x)  # grad mode on, nothing requires grad
    layer(x.requires_grad_())  # the input requires grad
    assert spy.calls == [(False, False), (False, False), (False, False), (True, True)]


def test_fused_cpu_large_buffers_are_reused_safely():
    """Buffers over 1 MB come from the extension's cache: a second call must not write into the
    outputs of the first one still held, and partial losses (only z_T; x without grad) must match."""
    torch.manual_seed(0)
    ref = lem.LEM(3, 70, dt=0.4, backend="reference")
    fused = lem.LEM(3, 70, dt=0.4, backend="cpp")
    fused.load_state_dict(ref.state_dict())
    x1, x2 = torch.randn(201, 20, 3), torch.randn(201, 20, 3)  # T odd: z_T of the inference path
    first = fused(x1)[0]
    kept = first.detach().clone()
    second = fused(x2)[0]
    second.sum().backward()
    assert torch.equal(first.detach(), kept)
    assert_close_relative(second, ref(x2)[0], "ys")
    for layer in (fused, ref):
        layer.zero_grad()
        layer(x2)[1][1].sum().backward()  # only z_T: no gradient reaches ys
    for (name, a), b in zip(fused.named_parameters(), ref.parameters()):
        assert_close_relative(a.grad, b.grad, name)
    with torch.no_grad():
        for T in (200, 201):
            assert_close_relative(fused(x1[:T])[1][1], ref(x1[:T])[1][1], f"z_T, T = {T}")
    cpu.empty_cache()
    torch.testing.assert_close(fused(x1)[0], first, rtol=0, atol=0)


def test_auto_uses_the_fused_cpu_path():
    assert kernels.resolve("auto", torch.device("cpu")) == "cpp"


def test_bad_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        lem.LEM(1, 4, backend="cuda")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        lem.LEM(1, 4, backend="triton")(torch.randn(3, 2, 1))


def test_compile_failure_falls_back_with_one_warning(tmp_path, monkeypatch):
    broken = tmp_path / "lem_cpu.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu, "SOURCE", broken)
    monkeypatch.setattr(cpu, "BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(kernels, "_broken", {})
    torch.manual_seed(0)
    layer = lem.LEM(2, 6, backend="auto")
    x = torch.randn(5, 3, 2)
    with pytest.warns(RuntimeWarning, match="'cpp' is unavailable.*reference"):
        ys = layer(x)[0]
    layer.backend = "reference"
    torch.testing.assert_close(ys, layer(x)[0], rtol=0, atol=0)
    layer.backend = "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per call
        layer(x)


def test_a_built_extension_is_imported_without_cpp_extension_load(tmp_path):
    built = Path(cpu.load().__file__)
    again = cpu._import_built(built.stem, built.parent)
    assert again is not None and callable(again.forward)
    assert cpu._import_built(built.stem, tmp_path) is None  # nothing built there
    (tmp_path / "lem_cpu_cut.so").write_bytes(b"\x7fELF cut off mid-link")
    assert cpu._import_built("lem_cpu_cut", tmp_path) is None  # cpp_extension.load then rebuilds it

def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_announced(tmp_path, capsys):
    import os
    lock = tmp_path / "lock"
    lock.write_text("")
    cpu._check_build_lock(lock)  # fresh: another process may be building; cpp_extension.load waits
    assert lock.exists() and f"waiting for {lock}" in capsys.readouterr().err
    old = lock.stat().st_mtime - cpu.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="removing .*lock: left 16 min ago"):
        cpu._check_build_lock(lock)
    assert not lock.exists()
    cpu._check_build_lock(lock)  # none: nothing to say


def test_gpu_tiers_under_the_interpreter():
    """tests/kernels/test_gpu_tiers.py on CPU tensors under Triton's interpreter. TRITON_INTERPRET must be
    set before Triton compiles the kernels' decorators: a fresh process."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_gpu_tiers.py"],
                          cwd=Path(__file__).parent, env=train_env(TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]


def test_bench_measures_every_backend(monkeypatch):
    monkeypatch.setitem(bench.CONFIGS, "tiny", (6, 4, 8, 2))
    rows = bench.bench_config("tiny", torch.device("cpu"), repeats=1, budget_s=1.0)
    assert set(rows) == {"reference", "cpp", "nn.LSTM"}
    for r in rows.values():
        assert r["fwd+bwd"] > 0 and r["fwd train"] > 0 and r["fwd no_grad"] > 0 and r["memory"] > 0
        assert r["peak train"] is None or r["peak train"] >= 0
    text = bench.table("tiny", torch.device("cpu"), rows)
    assert "| cpp | no_grad |" in text and "| nn.LSTM | grad mode on |" in text


def test_bench_peak_memory_sees_a_large_allocation():
    if bench.peak_bytes(lambda: None, torch.device("cpu")) is None:
        pytest.skip("peak resident memory is measured on Linux with glibc only")
    big = 64 * 2**20
    assert bench.peak_bytes(lambda: torch.ones(big // 4), torch.device("cpu")) >= big * 0.9
