"""Paired comparisons over seeds (pure functions): every claim compares two arms run on the same seed."""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """a - b per seed: mean, standard error of the mean (None with one seed), and the seeds' values."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples need equal, non-zero lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
    return {"mean": statistics.fmean(d), "se": se, "n": len(d), "per_seed": d}


def within_noise(diff: dict, k: float = 2.0) -> bool | None:
    """Not worse than the reference by more than k standard errors (None: one seed, no noise estimate)."""
    if diff["se"] is None:
        return None
    return diff["mean"] <= k * diff["se"]


def fmt(diff: dict) -> str:
    """'-0.0997 +- 0.0021' (or just the mean with one seed)."""
    return f"{diff['mean']:+.4f}" + (f" +- {diff['se']:.4f}" if diff["se"] is not None else "")


def spikes(values: Sequence[float], window: int = 20, factor: float = 2.0) -> int:
    """Steps whose value exceeds ``factor`` x the median of the previous ``window`` steps."""
    return sum(1 for i in range(window, len(values))
               if values[i] > factor * statistics.median(values[i - window:i]))


def smooth(values: Sequence[float], k: int) -> list[float]:
    """Trailing mean over up to ``k`` steps (for plotting noisy per-step curves)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out
