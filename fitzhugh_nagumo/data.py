"""FitzHugh-Nagumo trajectories (docs/paper.md §3.3), integrated with scipy's solve_ivp (RK45).

    v' = v − v³/3 − w + I,   w' = ε (v + a − b w),   I = 0.5, a = 0.7, b = 0.8, ε = 1/50
on t ∈ [0, 400], sampled at 1001 equispaced points, v0 ~ U(−1, 1), w0 = 0.
Input v(t_0 .. t_999), target v(t_1 .. t_1000).
"""
import numpy as np
import torch
from scipy.integrate import solve_ivp
from tqdm import tqdm

from lem.data import cached

I_EXT, A, B, EPS = 0.5, 0.7, 0.8, 1 / 50
T_END, N_POINTS = 400.0, 1001
SPLIT_SIZES = {"train": 128, "valid": 128, "test": 1024}


def fitzhugh_nagumo(t, state):
    v, w = state
    return [v - v ** 3 / 3 - w + I_EXT, EPS * (v + A - B * w)]


def trajectory(v0):
    """v at the 1001 sample times, starting from (v0, 0)."""
    t = np.linspace(0.0, T_END, N_POINTS)
    sol = solve_ivp(fitzhugh_nagumo, (0.0, T_END), [v0, 0.0], method="RK45", t_eval=t)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed for v0={v0}: {sol.message}")
    return sol.y[0]


def make_split(n, rng):
    """(x, y), each (T = 1000, n, 1): independent trajectories from v0 ~ U(−1, 1)."""
    v = np.stack([trajectory(v0) for v0 in tqdm(rng.uniform(-1.0, 1.0, n), desc="solve_ivp", leave=False, disable=None)])
    v = torch.from_numpy(v).float().T.unsqueeze(-1)  # (1001, n, 1)
    return v[:-1].contiguous(), v[1:].contiguous()


def load_splits(data_dir, seed, sizes=SPLIT_SIZES):
    """Train, valid and test splits drawn from one seeded generator; solved once, cached in data_dir
    (lem.data.cached; one file per seed and sizes)."""
    name = f"seed{seed}_" + "_".join(f"{split}{n}" for split, n in sizes.items()) + ".pt"
    params = {"seed": seed, "sizes": sizes, "I": I_EXT, "a": A, "b": B, "eps": EPS, "t_end": T_END,
              "points": N_POINTS, "solver": "solve_ivp RK45", "v0": "U(-1, 1) from np.random.RandomState(seed)"}

    def build():
        rng = np.random.RandomState(seed)
        return {split: make_split(n, rng) for split, n in sizes.items()}
    def whole(splits):  # the structure check of the cache: (x, y) of (T, n, 1) each, n as asked
        return set(splits) == set(sizes) and all(
            x.shape == y.shape == (N_POINTS - 1, sizes[k], 1) for k, (x, y) in splits.items())
    return cached(data_dir / "fitzhugh_nagumo" / name, build, params=params, check=whole)
