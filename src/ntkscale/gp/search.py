"""Derivative-free maximization on log grids: a 1-D grid plus golden section, a 2-D grid plus a
pattern search. Every evaluation is recorded and the best one returned."""

from __future__ import annotations

import math

import torch

__all__ = ["search_1d", "search_2d"]


def search_1d(objective, lo: float, hi: float, grid_size: int, refine_steps: int) -> float:
    """Maximize on a grid over ``[lo, hi]``, then golden-section in the best point's bracket."""
    seen: dict[float, float] = {}
    inner = objective

    def objective(t: float) -> float:  # noqa: F811  (records every evaluation)
        if t not in seen:
            seen[t] = inner(t)
        return seen[t]

    grid = torch.linspace(lo, hi, grid_size, dtype=torch.float64).tolist()
    values = [objective(g) for g in grid]
    i = max(range(grid_size), key=lambda j: values[j])
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid_size - 1)]
    golden = (math.sqrt(5) - 1) / 2
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = objective(c), objective(d)
    for _ in range(int(refine_steps)):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = objective(c)
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = objective(d)
    return max(seen, key=seen.get)


def search_2d(objective, box, grid_size: int, refine_steps: int) -> tuple[float, float]:
    """Maximize on a log grid over the box, then a pattern search with halving steps."""
    axes = [torch.linspace(lo, hi, grid_size, dtype=torch.float64).tolist() for lo, hi in box]
    best = max(((x, y) for x in axes[0] for y in axes[1]), key=objective)
    h = [(hi - lo) / (grid_size - 1) / 2 for lo, hi in box]
    for _ in range(int(refine_steps)):
        moves = [
            (min(max(best[0] + i * h[0], box[0][0]), box[0][1]), min(max(best[1] + j * h[1], box[1][0]), box[1][1]))
            for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)
        ]
        cand = max(moves, key=objective)
        if objective(cand) > objective(best):
            best = cand
        else:
            h = [v / 2 for v in h]
    return best
