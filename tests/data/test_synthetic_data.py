"""The generated data of the adding and FitzHugh-Nagumo experiments (docs/paper.md §3.1, §3.3)."""
from importlib import import_module
import numpy as np
import torch
from scipy.integrate import solve_ivp


adding = import_module("adding.data")
fhn = import_module("fitzhugh_nagumo.data")


def test_adding_one_marker_per_half_and_target_is_marked_sum():
    T, B = 101, 64
    x, y = adding.adding_batch(T, B, torch.Generator().manual_seed(0))
    assert x.shape == (T, B, 2) and y.shape == (B, 1)
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert set(markers.unique().tolist()) == {0.0, 1.0}
    half = T // 2
    assert (markers[:half].sum(0) == 1).all() and (markers[half:].sum(0) == 1).all()
    first = markers[:half].argmax(0)
    second = half + markers[half:].argmax(0)
    cols = torch.arange(B)
    torch.testing.assert_close(y[:, 0], values[first, cols] + values[second, cols])


def test_adding_batches_are_reproducible_from_their_seed():
    a = adding.adding_batch(50, 4, torch.Generator().manual_seed(7))
    b = adding.adding_batch(50, 4, torch.Generator().manual_seed(7))
    c = adding.adding_batch(50, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_fitzhugh_nagumo_against_direct_solve_ivp():
    v0 = 0.37
    t = np.linspace(0, 400, 1001)
    eps = 1 / 50
    direct = solve_ivp(lambda t, s: [s[0] - s[0] ** 3 / 3 - s[1] + 0.5, eps * (s[0] + 0.7 - 0.8 * s[1])],
                       (0, 400), [v0, 0.0], t_eval=t)
    np.testing.assert_allclose(fhn.trajectory(v0), direct.y[0])


def test_fitzhugh_nagumo_splits_shift_by_one_step_and_are_cached(tmp_path):
    sizes = {"train": 3, "valid": 2, "test": 2}
    splits = fhn.load_splits(tmp_path, seed=11, sizes=sizes)
    for name, (x, y) in splits.items():
        assert x.shape == y.shape == (1000, sizes[name], 1)
        torch.testing.assert_close(x[1:], y[:-1])
    rng = np.random.RandomState(11)
    v0 = rng.uniform(-1, 1, 3)
    np.testing.assert_allclose(splits["train"][0][0, :, 0].numpy(), v0, rtol=1e-6)
    np.testing.assert_allclose(splits["train"][1][:, 0, 0].numpy(), fhn.trajectory(v0[0])[1:], rtol=1e-5, atol=1e-6)
    assert not torch.equal(splits["train"][0][:, :2], splits["valid"][0])  # independent draws
    cached = list((tmp_path / "fitzhugh_nagumo").glob("*.pt"))
    assert len(cached) == 1
    again = fhn.load_splits(tmp_path, seed=11, sizes=sizes)
    assert torch.equal(again["test"][0], splits["test"][0])
