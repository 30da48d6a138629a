"""Merge weights and checkpoint selection: pure functions, no I/O.

Weights follow "Model Merging in Pre-training of Large Language Models" (Li et al., 2025,
arXiv 2505.12082) for SMA / EMA / WMA, and "Early Weight Averaging meets High Learning Rates
for LLM Pre-training" (Sanyal et al., 2023, arXiv 2306.03241) for LAWA (a uniform average of
the last k checkpoints taken every s-th save), and WSM (Tian et al., 2025, arXiv 2507.17634,
"WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging") for decay-emulating weights.
Checkpoints are always ordered oldest -> newest.
"""

from __future__ import annotations

import math
from typing import Sequence

from megatron_pma.errors import PMAError

METHODS = ("sma", "ema", "wma", "lawa", "wsm", "custom")
DECAYS = ("linear", "cosine", "inv-sqrt", "minus-sqrt")
DEFAULT_DECAY = "linear"
# inv-sqrt: Megatron-LM's ``inverse-square-root`` LR, lr = peak * sqrt(W / step), over a window
# 16x its warmup W: the emulated LR falls to 1/4 of the peak by the end of the window.
INV_SQRT_SPAN = 15.0


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


def decay_integral(decay: str, t: float) -> float:
    """Integral from 0 to ``t`` of the decay shape f, t in [0, 1] (fraction of the window).

    f(0) = 1 and f is non-increasing:
    ``linear`` 1 - t; ``cosine`` (1 + cos(pi t)) / 2; ``minus-sqrt`` 1 - sqrt(t) (Megatron-LM's
    ``--lr-wsd-decay-style minus_sqrt`` and the ``minus-sqrt`` weighting of its
    ``tools/checkpoint/weighted_merge.py``); ``inv-sqrt`` 1 / sqrt(1 + 15 t) (Megatron-LM's
    ``inverse-square-root`` LR, peak * sqrt(W / step), from the end of warmup W to 16 W).
    """
    if decay == "linear":
        return t - t * t / 2
    if decay == "cosine":
        return t / 2 + math.sin(math.pi * t) / (2 * math.pi)
    if decay == "minus-sqrt":
        return t - 2.0 / 3.0 * t ** 1.5
    if decay == "inv-sqrt":
        return 2.0 / INV_SQRT_SPAN * (math.sqrt(1 + INV_SQRT_SPAN * t) - 1)
    raise PMAError(f"unknown decay {decay!r}; choose one of {', '.join(DECAYS)}")


def wsm_update_weights(n: int, decay: str = DEFAULT_DECAY,
                       positions: Sequence[float] | None = None) -> list[float]:
    """WSM's w_1 >= ... >= w_k in [0, 1], one per update between consecutive checkpoints (k = n - 1).

    w_i is the mean of the decay shape over update i's span of the window, the span measured by
    ``positions`` (iteration or consumed tokens of each checkpoint, oldest first; default evenly
    spaced): the LR multiplier a decayed run would have applied, on average, to that update.
    """
    _check_n(n)
    if positions is None:
        positions = range(n)
    p = [float(x) for x in positions]
    if len(p) != n:
        raise PMAError(f"got {len(p)} positions for {n} checkpoints")
    if any(not math.isfinite(x) for x in p) or any(b <= a for a, b in zip(p, p[1:])):
        raise PMAError(f"checkpoint positions must be finite and strictly increasing, got {p}")
    if n == 1:
        return []
    span = p[-1] - p[0]
    t = [(x - p[0]) / span for x in p]
    t[-1] = 1.0
    w = [(decay_integral(decay, b) - decay_integral(decay, a)) / (b - a) for a, b in zip(t, t[1:])]
    w = [min(1.0, max(0.0, x)) for x in w]  # rounding only: the mean of f on [0, 1] lies in [0, 1]
    for i in range(1, len(w)):  # monotone by construction; rounding must not break it
        w[i] = min(w[i], w[i - 1])
    return w


def wsm(n: int, decay: str = DEFAULT_DECAY, positions: Sequence[float] | None = None) -> list[float]:
    """Decay-emulating merge weights (WSM, arXiv 2507.17634, section 3, eq. for theta-hat_{n+k}).

    Merging theta_0..theta_k with c_0 = 1 - w_1, c_j = w_j - w_{j+1} (0 < j < k), c_k = w_k
    gives theta_0 + sum_i w_i (theta_i - theta_{i-1}): each update scaled by the LR multiplier
    w_i of the decay it emulates (:func:`wsm_update_weights`). Non-negative because w is
    non-increasing; sums to 1 by telescoping.
    """
    w = wsm_update_weights(n, decay, positions)
    if not w:
        return [1.0]
    return [1.0 - w[0]] + [a - b for a, b in zip(w, w[1:])] + [w[-1]]


def weights(method: str, n: int, *, alpha: float = 0.2, values: Sequence[float] | None = None,
            normalize: bool = False, decay: str | None = None,
            positions: Sequence[float] | None = None, allow_extrapolation: bool = False) -> list[float]:
    """Weights for ``n`` checkpoints ordered oldest -> newest.

    ``lawa`` is a uniform average: its window/stride live in the selection, not the weights.
    ``wsm`` takes ``decay`` (default linear; also spelled ``method="wsm:cosine"``, the form that
    travels through APIs passing only a method name) and the checkpoints' ``positions``.
    """
    method, decay = parse_method(method, decay)
    if method == "wsm":
        if values is not None:
            raise PMAError("--weights only applies to --method custom, not 'wsm'")
        return wsm(n, decay, positions)
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


def parse_method(method: str, decay: str | None = None) -> tuple[str, str | None]:
    """``"wsm:cosine"`` -> ("wsm", "cosine"); checks that a decay goes only with wsm."""
    name, _, suffix = method.lower().partition(":")
    if suffix and decay is not None and suffix != decay:
        raise PMAError(f"method {method!r} conflicts with decay {decay!r}")
    decay = suffix or decay
    if decay is not None and name != "wsm":
        raise PMAError(f"--decay only applies to --method wsm, not {name!r}")
    if name == "wsm":
        decay = decay or DEFAULT_DECAY
        if decay not in DECAYS:
            raise PMAError(f"unknown decay {decay!r}; choose one of {', '.join(DECAYS)}")
    return name, decay


def method_spec(method: str, decay: str | None = None) -> str:
    """The one-string form of a schedule (``"wsm:cosine"``, or the method itself)."""
    name, decay = parse_method(method, decay)
    return f"{name}:{decay}" if name == "wsm" else name


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
