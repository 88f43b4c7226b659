"""The GPU kernels fit the chips our users have, checked without a GPU: what the dispatcher picks
for each architecture is compiled for it with Triton's compiler (lem/kernels/fit.py)."""
import pytest
import torch

pytest.importorskip("triton")
from lem.kernels import fit, resolve  # noqa: E402

CUDA = torch.device("cuda")


@pytest.mark.parametrize("arch", list(fit.ARCHS))
def test_what_the_dispatcher_picks_fits(arch):
    """Shared memory within the architecture's per-block limit, spill stack within 1 KiB, and the
    dispatcher's shared-memory bound for the on-chip tier an upper bound of what Triton allocates."""
    rows = fit.rows(archs=(arch,), every_variant=False)
    assert {r.tier for r in rows} == {"onchip", "stepwise"}
    assert not [r for r in rows if not fit.fits(r)], fit.table([r for r in rows if not fit.fits(r)])
    assert not [r for r in rows if r.bound and r.shared > r.bound], fit.table(rows)


def test_auto_picks_a_fused_tier_at_every_size_up_to_1024():
    for gpu in fit.ARCHS.values():
        for H in range(1, 1025):
            assert resolve("auto", CUDA, H, torch.float32, gpu=gpu) in ("onchip", "stepwise"), (gpu, H)


@pytest.mark.parametrize("arch, H, dtype, tier", [
    (86, 64, torch.float32, "onchip"), (86, 65, torch.float32, "stepwise"), (90, 128, torch.float32, "onchip"),
    (80, 128, torch.float32, "onchip"), (86, 128, torch.float32, "stepwise"), (80, 128, torch.bfloat16, "onchip"),
    (90, 128, torch.bfloat16, "onchip"), (86, 128, torch.bfloat16, "onchip"), (89, 128, torch.float16, "onchip"),
    (90, 256, torch.bfloat16, "stepwise"), (90, 256, torch.float32, "stepwise"), (80, 1024, torch.float32, "stepwise"),
    (90, 16, torch.float64, "reference"),
])
def test_the_dispatcher_picks_by_the_gpu(arch, H, dtype, tier):
    assert resolve("auto", CUDA, H, dtype, gpu=fit.ARCHS[arch]) == tier
    if tier == "stepwise":
        with pytest.raises(ValueError, match="'onchip' needs .* shared memory per block"):
            resolve("onchip", CUDA, H, dtype, gpu=fit.ARCHS[arch])
