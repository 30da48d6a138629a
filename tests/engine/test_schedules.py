"""Merge weights and window selection (pure functions), incl. property tests."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_pma import schedules
from megatron_pma.errors import PMAError


def test_paper_weights_small_n():
    assert schedules.sma(4) == [0.25] * 4
    assert schedules.wma(3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    # EMA(0.2), N=3: w1 = 0.8^2, w2 = 0.2*0.8, w3 = 0.2 (A_1 = M_1 initialisation)
    assert schedules.ema(3, 0.2) == pytest.approx([0.64, 0.16, 0.2])


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), alpha=st.floats(0.01, 1.0))
def test_weights_sum_to_one_and_newest_weighs_most(n, alpha):
    for method in ("sma", "wma", "lawa"):
        w = schedules.weights(method, n)
        assert math.isclose(sum(w), 1.0, rel_tol=1e-9)
        assert all(a <= b + 1e-15 for a, b in zip(w, w[1:]))  # oldest -> newest
    w = schedules.weights("ema", n, alpha=alpha)
    assert math.isclose(sum(w), 1.0, rel_tol=1e-9)
    assert all(x >= 0 for x in w)


@settings(max_examples=200, deadline=None)
@given(models=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=30), alpha=st.floats(0.01, 1.0))
def test_ema_recursion_equals_unrolled_form(models, alpha):
    acc = models[0]
    for m in models[1:]:
        acc = alpha * m + (1 - alpha) * acc
    unrolled = sum(w * m for w, m in zip(schedules.ema(len(models), alpha), models))
    assert unrolled == pytest.approx(acc, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("values, normalize, message", [
    ([0.5, 0.6], False, "sum to 1.1"),
    ([1.5, -0.5], False, "non-negative"),
    ([float("nan"), 1.0], False, "finite"),
    ([0.0, 0.0], True, "sum to 0"),
])
def test_custom_weights_rejected(values, normalize, message):
    with pytest.raises(PMAError, match=message):
        schedules.weights("custom", len(values), values=values, normalize=normalize)


def test_custom_weights_normalize_and_count():
    assert schedules.weights("custom", 2, values=[1, 3], normalize=True) == [0.25, 0.75]
    with pytest.raises(PMAError, match="2 weights for 3"):
        schedules.weights("custom", 3, values=[0.5, 0.5])
    with pytest.raises(PMAError, match="unknown merge method"):
        schedules.weights("swa", 3)
    with pytest.raises(PMAError, match="alpha"):
        schedules.ema(3, 0.0)


def test_select_window_consecutive_stride_and_interval():
    its = [100, 200, 300, 400, 500, 600]
    assert schedules.select_window(its, 3) == [3, 4, 5]
    assert schedules.select_window(its, 3, every=2) == [1, 3, 5]  # LAWA: every 2nd save
    assert schedules.select_window(its, 2, interval_iters=250) == [2, 5]
    assert schedules.select_window(its, 3, up_to_iteration=450) == [1, 2, 3]
    toks = [i * 1000 for i in its]
    assert schedules.select_window(its, 2, interval_tokens=300_000, tokens=toks) == [2, 5]
    with pytest.raises(PMAError, match="need 4 checkpoints spaced 200 iterations"):
        schedules.select_window(its, 4, interval_iters=200)


@settings(max_examples=200, deadline=None)
@given(its=st.lists(st.integers(0, 10_000), min_size=1, max_size=40, unique=True),
       n=st.integers(1, 8), interval=st.integers(1, 3000))
def test_select_window_properties(its, n, interval):
    try:
        picked = schedules.select_window(its, n, interval_iters=interval)
    except PMAError:
        return
    chosen = [its[i] for i in picked]
    assert len(chosen) == n
    assert chosen[-1] == max(its)  # the window ends at the newest checkpoint
    assert all(b - a >= interval for a, b in zip(chosen, chosen[1:]))
    assert chosen == sorted(chosen)
