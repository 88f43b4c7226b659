"""How the GPU tiers launch their Triton kernels, and the one Triton helper they share.

Every launch goes through `launch`, so that `python -m lem.kernels.fit` can record what a tier
would launch (kernel, arguments, compile options) without a GPU and compile exactly that for
each target architecture.
"""
import triton
import triton.language as tl

_recorder = None  # a list while the fit check records launches (see recording), else None


def launch(kernel, grid, *args, num_warps=4, num_stages=1, **constexprs):
    if _recorder is not None:
        _recorder.append((kernel, args, constexprs, num_warps, num_stages))
        return
    kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)


class recording:
    """with recording() as launches: run a tier on meta tensors; launches lists what it would launch."""

    def __enter__(self):
        global _recorder
        _recorder = []
        return _recorder

    def __exit__(self, *exc):
        global _recorder
        _recorder = None


@triton.jit
def tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0
