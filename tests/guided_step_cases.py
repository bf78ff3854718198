"""Random inputs for guided_step tests: every optional tensor present or absent."""

from __future__ import annotations

import itertools

import torch

from ate_fast.ops.constants import compute_dtype

OPTIONAL = ("x", "g", "m_prev", "z")
COEFFICIENT_OF = {"x": "a", "g": "c", "m_prev": "d", "z": "s"}
ALL_SUBSETS = [
    frozenset(c) for r in range(len(OPTIONAL) + 1) for c in itertools.combinations(OPTIONAL, r)
]


def make_inputs(shape, dtype, device="cpu", present=frozenset(OPTIONAL), scale=1.7, clamp=0.4):
    """Keyword arguments of guided_step_reference / guided_step_into (never zeros)."""
    cd = compute_dtype(dtype)
    batch = shape[0]

    def data():
        return (torch.randn(shape, dtype=torch.float64) * 2 + 0.1).to(dtype).to(device)

    def coef():
        return (torch.rand(batch, dtype=torch.float64) * 3 - 1.5).to(cd).to(device)

    args = dict.fromkeys(("x", "a", "g", "c", "m_prev", "d", "z", "s"))
    args.update(m=data(), b=coef(), scale=scale, clamp=clamp)
    for name in present:
        args[name] = data()
        args[COEFFICIENT_OF[name]] = coef()
    return args


def ordered(args):
    """Positional order of the registered op: x, m, a, b, g, c, m_prev, d, z, s, scale, clamp."""
    keys = ("x", "m", "a", "b", "g", "c", "m_prev", "d", "z", "s", "scale", "clamp")
    return tuple(args[k] for k in keys)
