"""Which input is oldest and which newest: pure functions over loaded inputs (any format).

Inputs are ordered by the iteration each was saved at (``order="iteration"``, the default), or
taken as the caller typed them (``order="given"``: for checkpoints that do not say their
iteration, or that all say the same one). Weights, whatever the order, go oldest -> newest, and
the newest input is the one whose non-averaged state (counters, RNG, extra state) the output keeps.
"""

from __future__ import annotations

from typing import Sequence

from megatron_pma.errors import PMAError
from megatron_pma.names import ORDERS


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise PMAError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")


def ordered(typed: Sequence, order: str) -> list:
    """``typed`` (each with ``.iteration``, ``.label``) oldest -> newest."""
    if order == "given":
        return list(typed)
    result = sorted(typed, key=lambda c: c.iteration)
    for a, b in zip(result, result[1:]):
        if a.iteration == b.iteration:
            raise PMAError(f"{b.label}: duplicate iteration {b.iteration} (also {a.label}); pass --order given "
                           "to take the inputs in the order typed")
    return result


def weights_warning(typed: Sequence, result: Sequence, weights: Sequence[float], order: str) -> str | None:
    """One line when explicit weights meet inputs typed out of iteration order: which weight went
    to which iteration (None when the order typed is the iteration order, or not known)."""
    its = [c.iteration for c in typed]
    if None in its or its == sorted(its):
        return None
    how = "in the order typed (--order given)" if order == "given" else "oldest first, sorted by iteration"
    pairs = ", ".join(f"{c.iteration}:{w:.4g}" for c, w in zip(result, weights))
    return f"warning: inputs given out of iteration order; --weights apply {how}: iteration:weight {pairs}"


def positions(result: Sequence) -> list[int] | None:
    """Where each input sits along the run (its iteration), for schedules that sample a curve at
    the checkpoints (WSM); None (evenly spaced) when an iteration is unknown or not increasing."""
    its = [c.iteration for c in result]
    if None in its or any(b <= a for a, b in zip(its, its[1:])):
        return None
    return its
