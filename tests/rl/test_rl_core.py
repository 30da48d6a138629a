"""Tests of the framework-free AR / Lopti core (arXiv:2505.12929)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_pma.rl.core import (
    LoptiConfig,
    _reference_taken_token_logprobs,
    clipped_policy_loss,
    k3_kl,
    lopti_masks,
    masked_aggregate,
    reweight_advantages,
    run_lopti_stages,
    taken_token_logprobs,
)


def _batch(b=4, t=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=dtype) * 3.0  # probabilities in (0.05, 1]
    cur = (old + 0.3 * torch.randn(b, t, generator=g, dtype=dtype)).clamp(max=0.0)
    adv = torch.randn(b, generator=g, dtype=dtype)
    mask = torch.ones(b, t, dtype=dtype)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    ref = old + 0.1 * torch.randn(b, t, generator=g, dtype=dtype)
    return cur.requires_grad_(), old, adv, mask, ref


# ---------------------------------------------------------------- AR


def test_reweight_advantages_formula_and_broadcast():
    old = torch.log(torch.tensor([[0.1, 0.5, 1.0], [0.9, 0.2, 0.04]], dtype=torch.float64))
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    out = reweight_advantages(adv, old, 0.3)
    expect = torch.tensor(
        [[2 * (0.3 * 0.1 + 0.7), 2 * (0.3 * 0.5 + 0.7), 2 * 1.0], [-(0.3 * 0.9 + 0.7), -(0.3 * 0.2 + 0.7), -(0.3 * 0.04 + 0.7)]],
        dtype=torch.float64,
    )
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, expect)
    # per-token advantages give the same thing
    torch.testing.assert_close(reweight_advantages(adv[:, None].expand(2, 3), old, 0.3), expect)


def test_reweight_advantages_off_is_identity_and_old_logprobs_detached():
    old = torch.randn(3, 4).clamp(max=0).requires_grad_()
    adv = torch.randn(3, 4)
    assert torch.equal(reweight_advantages(adv, old, 0.0), adv)
    out = reweight_advantages(adv.clone().requires_grad_(), old, 0.5)
    out.sum().backward()
    assert old.grad is None  # pi_old is a constant for AR


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_reweight_advantages_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError):
        reweight_advantages(torch.ones(2), torch.zeros(2, 2), alpha)


@settings(max_examples=50, deadline=None)
@given(
    alpha=st.floats(0.0, 1.0),
    p=st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=8),
    a=st.floats(-10, 10),
)
def test_reweight_advantages_properties(alpha, p, a):
    old = torch.tensor([p], dtype=torch.float64).log()
    adv = torch.tensor([a], dtype=torch.float64)
    out = reweight_advantages(adv, old, alpha)[0]
    # never amplifies, keeps the sign, is monotone in pi_old, and equals (alpha*pi_old + 1-alpha)*A.
    # Compared as products, never as out / a: a subnormal A (5e-324) rounds its product to 0 or to
    # the next subnormal, so a ratio would be off by 100 % while the product is exact to rounding.
    assert torch.all(out.abs() <= abs(a) + 1e-12)
    assert torch.all(out * a >= 0)
    order = torch.argsort(old[0])
    assert torch.all(torch.diff(out[order].abs()) >= 0)  # rounding is monotone, so this is exact
    torch.testing.assert_close(out, (alpha * old[0].exp() + (1 - alpha)) * a, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- Lopti groups


def test_lopti_masks_partition():
    probs = torch.tensor([[0.1, 0.5, 0.49, 0.9], [0.3, 0.7, 0.2, 0.6]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    low, high = lopti_masks(probs.log(), mask, 0.5)
    assert low.dtype == torch.bool and high.dtype == torch.bool
    assert low.tolist() == [[True, False, True, False], [True, False, False, False]]
    assert high.tolist() == [[False, True, False, True], [False, True, False, False]]
    assert not (low & high).any()
    assert torch.equal(low | high, mask.bool())


@settings(max_examples=30, deadline=None)
@given(eta=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_lopti_masks_partition_property(eta, seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(5, 7, generator=g) * 4
    mask = torch.rand(5, 7, generator=g) > 0.3
    low, high = lopti_masks(old, mask, eta)
    assert torch.equal(low | high, mask) and not (low & high).any()
    assert torch.all(old.exp()[low] < eta) and torch.all(old.exp()[high] >= eta)


def test_config_validation_and_stages():
    assert LoptiConfig().stages() == (None,)
    assert LoptiConfig(eta=0.5).stages() == ("low", "high")
    assert LoptiConfig(eta=0.5, low_first=False).stages() == ("high", "low")
    for bad in (dict(alpha=2), dict(eta=0.0), dict(eta=1.5), dict(dual_clip_c=1.0), dict(eps_low=1.0), dict(kl_coef=-1)):
        with pytest.raises(ValueError):
            LoptiConfig(**bad)


def test_run_lopti_stages_order_and_groups():
    old = torch.tensor([[0.1, 0.8, 0.3], [0.6, 0.05, 0.9]]).log()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    calls = []
    out = run_lopti_stages(lambda m, name: calls.append((name, m.clone())) or name, old, mask, 0.5)
    assert out == ["low", "high"]
    assert calls[0][1].tolist() == [[True, False, True], [False, True, False]]
    assert calls[1][1].tolist() == [[False, True, False], [True, False, False]]
    calls.clear()
    run_lopti_stages(lambda m, name: calls.append(name), old, mask, 0.5, low_first=False)
    assert calls == ["high", "low"]
    calls.clear()
    run_lopti_stages(lambda m, name: calls.append((m, name)), old, mask, None)
    assert calls == [(None, None)]
    calls.clear()
    run_lopti_stages(lambda m, name: calls.append(name), old, mask, 1e-3, skip_empty=True)
    assert calls == ["high"]


# ---------------------------------------------------------------- the loss


def _manual_loss(cur, old, adv, mask, eps_low, eps_high, c=None, ref=None, beta=0.0, token_level=True, num_mask=None):
    """Straight loops over tokens, written independently of the vectorised implementation."""
    num_mask = mask if num_mask is None else num_mask
    b, t = cur.shape
    per_seq = []
    total = 0.0
    for i in range(b):
        s = 0.0
        for j in range(t):
            if num_mask[i, j] == 0:
                continue
            a = float(adv[i]) if adv.dim() == 1 else float(adv[i, j])
            r = math.exp(float(cur[i, j]) - float(old[i, j]))
            rc = min(max(r, 1 - eps_low), 1 + eps_high)
            v = max(-a * r, -a * rc)
            if c is not None and a < 0:
                v = min(v, -c * a)
            if beta:
                d = float(ref[i, j]) - float(cur[i, j])
                v += beta * (math.exp(d) - d - 1)
            s += v
        total += s
        per_seq.append(s / max(float(mask[i].sum()), 1.0))
    if token_level:
        return total / float(mask.sum())
    n = sum(1 for i in range(b) if mask[i].sum() > 0)
    return sum(per_seq) / n


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("c", [None, 3.0])
def test_clipped_policy_loss_matches_manual(token_level, c):
    cur, old, adv, mask, ref = _batch(seed=1)
    loss, metrics = clipped_policy_loss(
        cur, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip_c=c, ref_logprobs=ref, kl_coef=0.01,
        token_level=token_level,
    )
    expect = _manual_loss(cur.detach(), old, adv, mask, 0.2, 0.28, c, ref, 0.01, token_level)
    assert loss.item() == pytest.approx(expect, rel=1e-10)
    assert set(metrics) >= {"pg_loss", "kl", "clipfrac", "ratio_mean", "stage_token_frac"}


def test_asymmetric_clip_stops_gradient_outside_the_trust_region():
    old = torch.zeros(1, 4, dtype=torch.float64)
    cur = torch.log(torch.tensor([[1.3, 1.1, 0.7, 0.9]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, m = clipped_policy_loss(cur, old, adv, torch.ones(1, 4), eps_low=0.2, eps_high=0.28)
    loss.backward()
    g = cur.grad[0]
    # ratio 1.3 > 1.28 with A>0: clipped, no gradient; 1.1 inside: gradient -A*r/4
    assert g[0].item() == 0.0
    assert g[1].item() == pytest.approx(-1.1 / 4)
    # ratio 0.7 < 0.8 with A<0: clipped; 0.9 inside
    assert g[2].item() == 0.0
    assert g[3].item() == pytest.approx(0.9 / 4)
    assert m["clipfrac"].item() == pytest.approx(0.5)


def test_dual_clip_caps_negative_advantage_loss():
    old = torch.zeros(1, 2, dtype=torch.float64)
    cur = torch.log(torch.tensor([[5.0, 2.0]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    loss, m = clipped_policy_loss(cur, old, adv, torch.ones(1, 2), eps_low=0.2, eps_high=0.2, dual_clip_c=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2)
    loss.backward()
    assert cur.grad[0, 0].item() == 0.0 and cur.grad[0, 1].item() != 0.0
    assert m["clipfrac_lower"].item() == pytest.approx(0.5)


def test_k3_kl():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.allclose(k3_kl(lp, lp), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = ref - lp
    assert torch.allclose(k3_kl(lp, ref), d.exp() - d - 1)
    assert torch.all(k3_kl(lp, ref) >= 0)


@pytest.mark.parametrize("token_level", [True, False])
def test_stage_mask_keeps_normaliser(token_level):
    """The two Lopti stage losses add up to the full loss; gradients too (same normaliser)."""
    cur, old, adv, mask, ref = _batch(seed=3)
    kw = dict(eps_low=0.2, eps_high=0.24, ref_logprobs=ref, kl_coef=0.05, token_level=token_level, alpha=0.3)
    full, _ = clipped_policy_loss(cur, old, adv, mask, **kw)
    (g_full,) = torch.autograd.grad(full, cur)
    low, high = lopti_masks(old, mask, 0.5)
    assert low.any() and high.any()
    l_low, m_low = clipped_policy_loss(cur, old, adv, mask, stage_mask=low, **kw)
    l_high, m_high = clipped_policy_loss(cur, old, adv, mask, stage_mask=high, **kw)
    torch.testing.assert_close(l_low + l_high, full)
    (g_low,) = torch.autograd.grad(l_low, cur)
    (g_high,) = torch.autograd.grad(l_high, cur)
    torch.testing.assert_close(g_low + g_high, g_full)
    assert torch.all(g_low[~low] == 0) and torch.all(g_high[~high] == 0)
    assert (m_low["stage_token_frac"] + m_high["stage_token_frac"]).item() == pytest.approx(1.0)
    # Changing the response mask instead (the wrong way) changes the normaliser and the value.
    wrong, _ = clipped_policy_loss(cur, old, adv, mask * low, **kw)
    assert not torch.allclose(wrong, l_low)


def test_ar_in_loss_equals_reweighted_advantages():
    cur, old, adv, mask, _ = _batch(seed=4)
    a, _ = clipped_policy_loss(cur, old, adv, mask, alpha=0.25)
    b, _ = clipped_policy_loss(cur, old, reweight_advantages(adv, old, 0.25), mask)
    torch.testing.assert_close(a, b)
    c, _ = clipped_policy_loss(cur, old, adv, mask)
    assert not torch.allclose(a, c)


def test_masked_aggregate_ignores_nan_in_padding_and_uses_normalizer():
    v = torch.tensor([[1.0, float("nan")], [2.0, 4.0]])
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert masked_aggregate(v, m).item() == pytest.approx(7 / 3)
    assert masked_aggregate(v, m, normalizer=torch.tensor(7.0)).item() == pytest.approx(1.0)
    assert masked_aggregate(v, m, token_level=False).item() == pytest.approx((1 + 3) / 2)


# ---------------------------------------------------------------- taken-token log-probs


@pytest.mark.parametrize("scratch", [1 << 25, 64])  # one shot, and many row chunks
def test_taken_token_logprobs_single_rank(scratch):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 17, (3, 5))
    out = taken_token_logprobs(logits, tokens, scratch_bytes=scratch)
    expect = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out, expect)
    assert torch.autograd.gradcheck(lambda x: taken_token_logprobs(x, tokens, scratch_bytes=scratch), (logits,))


def test_taken_token_logprobs_bf16_and_large_logits():
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 50) * 30 + 1000).bfloat16().requires_grad_()
    tokens = torch.randint(0, 50, (2, 3))
    out = taken_token_logprobs(logits, tokens)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference_taken_token_logprobs(logits, tokens), rtol=1e-5, atol=1e-4)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_taken_token_logprobs_shape_check():
    with pytest.raises(ValueError):
        taken_token_logprobs(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
