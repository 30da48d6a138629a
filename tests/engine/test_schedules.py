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


# --- WSM: decay-emulating weights (arXiv 2507.17634, section 3) ---------------------------------

positions_st = st.lists(st.integers(0, 10**6), min_size=1, max_size=40, unique=True).map(sorted)


def test_wsm_linear_hand_derived():
    # k = 2 even intervals: w = mean of 1 - t over [0, 1/2] and [1/2, 1] = 3/4, 1/4
    # -> c = (1 - 3/4, 3/4 - 1/4, 1/4)
    assert schedules.wsm_update_weights(3, "linear") == pytest.approx([0.75, 0.25])
    assert schedules.wsm(3, "linear") == pytest.approx([0.25, 0.5, 0.25])
    # k = 3: w = 5/6, 1/2, 1/6 -> c = 1/6, 1/3, 1/3, 1/6
    assert schedules.weights("wsm", 4) == pytest.approx([1 / 6, 1 / 3, 1 / 3, 1 / 6])
    # uneven: checkpoints at 0, 10, 40 -> t = 0, 1/4, 1; w = 7/8, 3/8 -> c = 1/8, 1/2, 3/8
    assert schedules.weights("wsm", 3, decay="linear", positions=[0, 10, 40]) == pytest.approx([0.125, 0.5, 0.375])
    assert schedules.wsm(1) == [1.0]


def test_wsm_decay_shapes_match_megatron_lr_styles():
    """Each decay's w_i is the mean over update i's span of Megatron-LM's LR multiplier of that name."""
    import numpy as np

    t = np.linspace(0, 1, 400_001)
    shapes = {"linear": 1 - t, "cosine": 0.5 * (1 + np.cos(np.pi * t)), "minus-sqrt": 1 - np.sqrt(t),
              "inv-sqrt": np.sqrt(1 / (1 + schedules.INV_SQRT_SPAN * t))}
    for decay, f in shapes.items():
        w = schedules.wsm_update_weights(5, decay)
        means = [f[(t >= a) & (t <= b)].mean() for a, b in zip(np.linspace(0, 1, 5), np.linspace(0, 1, 5)[1:])]
        assert w == pytest.approx(means, abs=1e-4), decay


@settings(max_examples=200, deadline=None)
@given(pos=positions_st, decay=st.sampled_from(schedules.DECAYS))
def test_wsm_weights_non_negative_sum_to_one(pos, decay):
    c = schedules.weights("wsm", len(pos), decay=decay, positions=pos)
    assert all(x >= 0 for x in c)
    assert math.isclose(sum(c), 1.0, rel_tol=1e-12, abs_tol=1e-12)
    w = schedules.wsm_update_weights(len(pos), decay, pos)
    assert all(1 >= a >= b >= 0 for a, b in zip(w, w[1:] + [0.0]))


@settings(max_examples=200, deadline=None)
@given(pos=positions_st, decay=st.sampled_from(schedules.DECAYS),
       steps=st.lists(st.lists(st.floats(-10, 10), min_size=3, max_size=3), min_size=39, max_size=39),
       start=st.lists(st.floats(-100, 100), min_size=3, max_size=3))
def test_wsm_merge_is_theta0_minus_weighted_updates(pos, decay, steps, start):
    """sum_j c_j theta_j == theta_0 - sum_i w_i g_i with g_i = theta_{i-1} - theta_i (a synthetic
    trajectory of 3-parameter models)."""
    import numpy as np

    traj = np.cumsum(np.array([start] + steps[: len(pos) - 1]), axis=0)  # theta_0 .. theta_k
    c = np.array(schedules.wsm(len(pos), decay, pos))
    w = np.array(schedules.wsm_update_weights(len(pos), decay, pos))
    merged = c @ traj
    g = traj[:-1] - traj[1:]
    assert merged == pytest.approx(traj[0] - w @ g if len(w) else traj[0], abs=1e-9)


def test_wsm_method_spec_and_errors():
    assert schedules.weights("wsm:cosine", 4) == schedules.weights("wsm", 4, decay="cosine")
    assert schedules.method_spec("wsm") == "wsm:linear"
    assert schedules.method_spec("WSM", "inv-sqrt") == "wsm:inv-sqrt"
    assert schedules.method_spec("ema") == "ema"
    for call, message in [
        (lambda: schedules.weights("sma", 3, decay="cosine"), "only applies to --method wsm"),
        (lambda: schedules.weights("wsm", 3, decay="exp"), "unknown decay 'exp'"),
        (lambda: schedules.weights("wsm:linear", 3, decay="cosine"), "conflicts"),
        (lambda: schedules.weights("wsm", 3, positions=[0, 5]), "2 positions for 3"),
        (lambda: schedules.weights("wsm", 3, positions=[0, 5, 5]), "strictly increasing"),
        (lambda: schedules.weights("wsm", 2, values=[0.5, 0.5]), "only applies to --method custom"),
    ]:
        with pytest.raises(PMAError, match=message):
            call()
