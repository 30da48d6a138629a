"""Merge weights and checkpoint selection: pure functions, no I/O.

Weights follow "Model Merging in Pre-training of Large Language Models" (Li et al., 2025,
arXiv 2505.12082) for SMA / EMA / WMA, and "Early Weight Averaging meets High Learning Rates
for LLM Pre-training" (Sanyal et al., 2023, arXiv 2306.03241) for LAWA (a uniform average of
the last k checkpoints taken every s-th save). Checkpoints are always ordered oldest -> newest.
"""

from __future__ import annotations

import math
from typing import Sequence

from megatron_pma.errors import PMAError

METHODS = ("sma", "ema", "wma", "lawa", "custom")


def sma(n: int) -> list[float]:
    """Simple moving average: w_i = 1/N."""
    _check_n(n)
    return [1.0 / n] * n


def ema(n: int, alpha: float = 0.2) -> list[float]:
    """Exponential moving average with A_1 = M_1, A_i = a*M_i + (1-a)*A_{i-1}, unrolled.

    w_1 = (1-a)^(N-1), w_i = a*(1-a)^(N-i) for i >= 2; the weights sum to 1 exactly
    (up to rounding) because the oldest model absorbs the initialisation mass.
    """
    _check_n(n)
    if not (0.0 < alpha <= 1.0) or not math.isfinite(alpha):
        raise PMAError(f"EMA alpha must be in (0, 1], got {alpha}")
    w = [alpha * (1.0 - alpha) ** (n - i) for i in range(1, n + 1)]
    w[0] = (1.0 - alpha) ** (n - 1)
    return w


def wma(n: int) -> list[float]:
    """Weighted moving average: w_i = i / (N(N+1)/2), newer checkpoints weigh more."""
    _check_n(n)
    total = n * (n + 1) / 2
    return [i / total for i in range(1, n + 1)]


def custom(values: Sequence[float], normalize: bool = False, tol: float = 1e-6,
           allow_extrapolation: bool = False) -> list[float]:
    """Explicit weights: finite, non-negative, summing to 1 within ``tol`` unless ``normalize``.

    ``allow_extrapolation`` (model soups, task arithmetic) accepts negative weights and any sum;
    they must still be finite (and sum to non-zero if ``normalize``).
    """
    w = [float(v) for v in values]
    _check_n(len(w))
    nonfinite = [v for v in w if not math.isfinite(v)]
    if nonfinite:
        raise PMAError(f"custom weights must be finite, got {nonfinite[0]}")
    negative = [v for v in w if v < 0]
    if negative and not allow_extrapolation:
        raise PMAError(f"custom weights must be non-negative, got {negative[0]} "
                       "(pass --allow-extrapolation to extrapolate)")
    total = sum(w)
    if normalize:
        if total == 0 or (total < 0 and not allow_extrapolation):
            raise PMAError(f"custom weights sum to {total:.8g}: cannot --normalize them")
        return [v / total for v in w]
    if total <= 0 and not allow_extrapolation:
        raise PMAError("custom weights sum to 0")
    if abs(total - 1.0) > tol and not allow_extrapolation:
        raise PMAError(f"custom weights sum to {total:.8g}, not 1 (pass --normalize to rescale, or "
                       "--allow-extrapolation to keep them)")
    return w


def weights(method: str, n: int, *, alpha: float = 0.2, values: Sequence[float] | None = None,
            normalize: bool = False, allow_extrapolation: bool = False) -> list[float]:
    """Weights for ``n`` checkpoints ordered oldest -> newest.

    ``lawa`` is a uniform average: its window/stride live in the selection, not the weights.
    """
    method = method.lower()
    if method == "custom" or (values is not None and method not in ("sma", "ema", "wma", "lawa")):
        if values is None:
            raise PMAError("method 'custom' needs --weights w1,w2,...")
        if len(values) != n:
            raise PMAError(f"got {len(values)} weights for {n} checkpoints")
        return custom(values, normalize=normalize, allow_extrapolation=allow_extrapolation)
    if values is not None:
        raise PMAError(f"--weights only applies to --method custom, not {method!r}")
    if method in ("sma", "lawa"):
        return sma(n)
    if method == "ema":
        return ema(n, alpha)
    if method == "wma":
        return wma(n)
    raise PMAError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")


def select_window(
    iterations: Sequence[int],
    num_models: int,
    *,
    interval_iters: int | None = None,
    interval_tokens: int | None = None,
    tokens: Sequence[int] | None = None,
    every: int = 1,
    up_to_iteration: int | None = None,
) -> list[int]:
    """Indices (ascending) of the checkpoints that form the merge window.

    Starting from the newest checkpoint (<= ``up_to_iteration``), walk back: with an interval,
    each next pick is the newest checkpoint at least ``interval`` iterations (or tokens,
    using ``tokens[i]`` consumed by checkpoint i) older than the last pick; without one,
    every ``every``-th save (LAWA's stride). Raises PMAError if fewer than ``num_models`` fit.
    """
    _check_n(num_models)
    if interval_iters is not None and interval_tokens is not None:
        raise PMAError("give --interval-iters or --interval-tokens, not both")
    if every < 1:
        raise PMAError(f"stride must be >= 1, got {every}")
    order = sorted(range(len(iterations)), key=lambda i: iterations[i])
    if up_to_iteration is not None:
        order = [i for i in order if iterations[i] <= up_to_iteration]
    if not order:
        raise PMAError("no checkpoint to merge" + (f" at or before iteration {up_to_iteration}"
                                                   if up_to_iteration is not None else ""))
    if interval_tokens is not None:
        if tokens is None:
            raise PMAError("--interval-tokens needs tokens per checkpoint (or --tokens-per-iter)")
        position, interval = tokens, interval_tokens
    elif interval_iters is not None:
        position, interval = iterations, interval_iters
    else:
        position, interval = None, None
    if interval is not None and interval <= 0:
        raise PMAError(f"interval must be positive, got {interval}")

    picked = [order[-1]]
    if position is None:
        picked = order[::-1][::every][:num_models]
    else:
        candidates = order[:-1][::-1]  # newest first
        for i in candidates:
            if len(picked) == num_models:
                break
            if position[picked[-1]] - position[i] >= interval:
                picked.append(i)
    if len(picked) < num_models:
        spacing = (f" spaced {interval} {'tokens' if interval_tokens else 'iterations'} apart"
                   if interval is not None else (f" taking every {every}-th" if every > 1 else ""))
        raise PMAError(f"need {num_models} checkpoints{spacing}, found {len(picked)} "
                       f"(available iterations: {summarize_iterations([iterations[i] for i in order])})")
    return sorted(picked, key=lambda i: iterations[i])


def summarize_iterations(iterations: Sequence[int], head: int = 2, tail: int = 1) -> str:
    """``10, 20, 30`` when short; ``10, 20, ..., 990 (99 iterations)`` when a list would run long."""
    its = list(iterations)
    if len(its) <= head + tail + 2:
        return ", ".join(map(str, its)) or "none"
    return ", ".join(map(str, its[:head])) + ", ..., " + ", ".join(map(str, its[-tail:])) + f" ({len(its)} iterations)"


def _check_n(n: int) -> None:
    if n < 1:
        raise PMAError(f"need at least one checkpoint to merge, got {n}")
