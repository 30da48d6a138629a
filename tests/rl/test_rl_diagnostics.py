"""Gradient-norm diagnostic on a real (tiny) model, checked against the bounds of arXiv:2505.12929."""


import pytest
import torch

from megatron_pma.rl.diagnostics import (
    grad_norm_bounds,
    plot_grad_norm_vs_prob,
    summarize_by_prob_bins,
    token_grad_norms,
)


def _tiny_model_logits(vocab=23, b=6, t=12, seed=0, train_steps=10):
    """A tiny causal LM (embedding -> causal mean -> MLP) briefly trained on a noisy repetitive
    pattern, so its token probabilities span (0, 1) rather than sitting near 1/N."""
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(vocab, 32)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, vocab))
    params = list(emb.parameters()) + list(mlp.parameters())
    opt = torch.optim.Adam(params, lr=5e-2)
    pattern = torch.tensor([(3 * i) % 7 for i in range(t + 1)])
    data = pattern.repeat(b, 1)
    noise = torch.rand(b, t + 1) < 0.3
    data = torch.where(noise, torch.randint(0, vocab, (b, t + 1)), data)

    def forward(x):
        h = emb(x)
        ctx = torch.cumsum(h, 1) / torch.arange(1, x.shape[1] + 1)[None, :, None]
        return mlp(torch.cat([h, ctx], -1))

    for _ in range(train_steps):
        logits = forward(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # held-out sequences from the same noisy process: the off-pattern tokens get low probability
    fresh = torch.where(torch.rand(b, t + 1) < 0.3, torch.randint(0, vocab, (b, t + 1)), pattern.repeat(b, 1))
    with torch.no_grad():
        logits = forward(fresh[:, :-1])
    return logits, fresh[:, 1:], vocab


def test_bounds_hold_on_real_model_gradients(tmp_path):
    logits, tokens, vocab = _tiny_model_logits()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, :3] = False
    probs, norms = token_grad_norms(logits, tokens, mask)
    assert probs.numel() == int(mask.sum())
    assert probs.min() < 0.1 and probs.max() > 0.6  # a real spread of probabilities
    lo, hi = grad_norm_bounds(probs, vocab)
    assert torch.all(norms >= lo - 1e-9) and torch.all(norms <= hi + 1e-9)
    # autograd agrees with the closed form
    p2, n2 = token_grad_norms(logits, tokens, mask, method="analytic")
    torch.testing.assert_close(p2, probs)
    torch.testing.assert_close(n2, norms)
    # low-probability tokens get the larger gradients
    rows = summarize_by_prob_bins(probs, norms)
    filled = [r for r in rows if r["count"]]
    assert filled[0]["mean_norm"] > filled[-1]["mean_norm"]
    out = plot_grad_norm_vs_prob(probs, norms, vocab, tmp_path / "grad_norm_vs_prob.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_bounds_are_attained():
    n = 10
    # lower bound: remaining mass spread evenly; upper: all on one other token
    p = 0.3
    even = torch.full((n,), (1 - p) / (n - 1))
    even[0] = p
    one = torch.zeros(n)
    one[0], one[1] = p, 1 - p
    lo, hi = grad_norm_bounds(torch.tensor(p), n)
    for dist, bound in ((even, lo), (one, hi)):
        _, norm = token_grad_norms(dist.log()[None].clamp(min=-80), torch.tensor([0]))
        assert norm.item() == pytest.approx(bound.item(), rel=1e-6)
    with pytest.raises(ValueError):
        grad_norm_bounds(torch.tensor(0.5), 1)
