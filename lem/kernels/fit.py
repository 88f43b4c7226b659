"""Do the GPU kernels fit the chip? Checked without a GPU (docs/kernels.md).

    python -m lem.kernels.fit                          # sm_80, sm_86, sm_89, sm_90; H 16 ... 1024
    python -m lem.kernels.fit --archs 86 --hidden 64 128 --dtypes bfloat16

For each architecture, hidden size and GEMM dtype: ask the dispatcher which tier it would pick on
that GPU (its compute capability and shared memory per block), run that tier's forward and backward
on meta tensors to record every kernel launch (each variant: with and without the state-dropout
mask, with and without per-row lengths, with and without a backward to feed), compile each recorded
kernel with Triton's compiler for
that architecture, and read its resources from the cubin (cuobjdump, shipped in Triton's wheel).
A kernel fits when its shared memory (Triton's dynamic allocation plus the cubin's static one) is
within the architecture's per-block limit and its spill stack within 1 KiB. The stepwise tier, the
fallback of every call, is checked at every size too. Exits 1 if anything does not fit.
"""
import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections import namedtuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import gpu, launch, resolve

# per-block shared memory limits (opt-in) of the GPUs our users have
ARCHS = {80: gpu.GPU(80, 166912),  # A100
         86: gpu.GPU(86, 101376),  # RTX 30xx, A10, A40
         89: gpu.GPU(89, 101376),  # RTX 40xx, L4, L40
         90: gpu.GPU(90, 232448)}  # H100, H200
HIDDEN = (16, 32, 64, 128, 256, 1024)  # the sizes the experiments use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_STACK = 1024
BATCH = 128  # the batch the launches are recorded with (ints divisible by 16 compile as such)
Row = namedtuple("Row", "kernel tier H dtype arch shared registers stack limit bound")
_compiled = {}  # compile key -> (shared, registers, stack): each kernel is compiled once per process


def launches(tier, H, dtype, every_variant=True, chip=None):
    """Every distinct kernel launch of `tier` at hidden size H, inputs of `dtype`, as recorded; with
    every_variant False only those of a training step with the state-dropout mask and per-row
    lengths (the variants that hold the most: the test suite's cheaper check)."""
    meta = torch.device("meta")
    T, B, I = 3, BATCH, 2
    t = lambda *shape: torch.empty(*shape, device=meta)
    w = dict(w_in=t(4 * H, I), b_in=t(4 * H), w_hh=t(3 * H, H), b_hh=t(3 * H), w_tz=t(H, H), b_tz=t(H))
    found = {}
    lengths = torch.empty(B, dtype=torch.int64, device=meta)
    with launch.recording() as recorded, _configured_for(chip):
        for mask in (None, t(B, H)) if every_variant else (t(B, H),):
            for lens in (None, lengths) if every_variant else (lengths,):
                for keep in (False, True) if every_variant else (True,):  # backward takes the acts of keep=True
                    ys, zs, acts = gpu.forward(tier, dtype, t(T, B, I), w["w_in"], w["b_in"], t(B, H), t(B, H),
                                               w["w_hh"], w["b_hh"], w["w_tz"], w["b_tz"], mask, lens, 0.5, keep)
                gpu.backward(tier, dtype, None, t(B, H), acts, ys, zs, t(T, B, I), w["w_in"], w["w_hh"], w["w_tz"],
                             mask, lens, 0.5, True)
    for kernel, args, constexprs, num_warps, num_stages in recorded:
        signature, constants, attrs = _signature(kernel, args, constexprs)
        key = (kernel.__name__, tuple(signature.items()), tuple(constants.items()), str(attrs), num_warps, num_stages)
        found[key] = (kernel, signature, constants, attrs, num_warps, num_stages)
    return found


@contextlib.contextmanager
def _configured_for(chip):
    """The on-chip kernels configured for `chip` (its shared memory decides whether the gate blocks stream)."""
    gpu.onchip.TARGET = chip
    try:
        yield
    finally:
        gpu.onchip.TARGET = None


def _signature(kernel, args, constexprs):
    """Triton's signature, constants and attributes for these arguments, specialised as its JIT
    specialises them: pointers (all 16-byte aligned here) and ints divisible by 16 get the
    divisibility hint, None and an int equal to 1 become constants (unless do_not_specialize)."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, (param, arg) in enumerate(zip(kernel.params, args)):
        name = param.name
        if arg is None:  # an unused pointer (HAS_MASK, HAS_LEN or KEEP off)
            signature[name], constants[name] = "constexpr", None
        elif isinstance(arg, torch.Tensor):
            signature[name] = "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                                     torch.int64: "i64"}[arg.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(arg, float):
            signature[name] = "fp32"
        elif param.do_not_specialize:
            signature[name] = "i32"
        elif arg == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if arg % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constants, attrs


def resources(kernel, signature, constants, attrs, num_warps, num_stages, capability):
    """(shared memory bytes, registers, stack bytes) of the kernel compiled for sm_<capability>."""
    key = (kernel.__name__, tuple(signature.items()), tuple(constants.items()), str(attrs), num_warps, num_stages,
           capability)
    if key not in _compiled:
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        usage = _cuobjdump(compiled.asm["cubin"])
        _compiled[key] = (compiled.metadata.shared + usage["SHARED"], usage["REG"], usage["STACK"])
    return _compiled[key]


def _cuobjdump(cubin):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED):(\d+)", out)}


def rows(archs=tuple(ARCHS), hidden=HIDDEN, dtypes=tuple(DTYPES), every_variant=True):
    """One Row per distinct kernel the dispatcher can launch for each (arch, H, dtype)."""
    out = []
    for capability in archs:
        chip = ARCHS[capability]
        for name in dtypes:
            dtype = DTYPES[name]
            for H in hidden:
                chosen = resolve("triton", torch.device("cuda"), H, dtype, gpu=chip)
                for tier in dict.fromkeys([chosen, "stepwise"]):  # stepwise: every call's fallback
                    bound = None
                    if tier == "onchip":
                        bound = gpu.onchip.shared_memory(H, dtype, gpu.onchip.stream_gates(H, dtype, chip.shared_memory))
                    for kernel, *compile_args in launches(tier, H, dtype, every_variant, chip).values():
                        shared, registers, stack = resources(kernel, *compile_args, capability)
                        out.append(Row(kernel.__name__, tier, H, name, f"sm_{capability}", shared, registers, stack,
                                       chip.shared_memory, bound))
    return out


def fits(row):
    return row.shared <= row.limit and row.stack <= MAX_STACK


def table(rows):
    """Markdown: one line per kernel, tier, dtype and arch with the largest figures over its variants,
    sizes with equal figures on one line."""
    merged = {}
    for r in rows:
        old = merged.get(r[:5])
        merged[r[:5]] = r if old is None else old._replace(shared=max(old.shared, r.shared),
                                                           registers=max(old.registers, r.registers),
                                                           stack=max(old.stack, r.stack))
    sizes = {}
    for r in merged.values():
        sizes.setdefault(r._replace(H=None), []).append(str(r.H))
    lines = ["| kernel | tier | H | dtype | arch | shared memory B (dispatcher's bound) | registers | spill stack B "
             "| limit B | fits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r, hs in sizes.items():
        bound = f" ({r.bound:,})" if r.bound else ""
        lines.append(f"| {r.kernel} | {r.tier} | {', '.join(hs)} | {r.dtype} | {r.arch} | {r.shared:,}{bound} | "
                     f"{r.registers} | {r.stack} | {r.limit:,} | {'yes' if fits(r) else '**no**'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = p.parse_args(argv)
    found = rows(args.archs, args.hidden, args.dtypes)
    print(f"Triton {triton.__version__}, torch {torch.__version__}; batch {BATCH}; each kernel variant "
          f"(state-dropout mask or not, per-row lengths or not, backward to feed or not) compiled once")
    print(table(found))
    bad = [r for r in found if not fits(r)]
    if bad:
        print(f"{len(bad)} kernel configurations do not fit", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
