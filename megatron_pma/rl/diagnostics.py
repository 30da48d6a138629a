"""Per-token gradient norms with respect to the logits vs. token probability.

Yang et al., "Do Not Let Low-Probability Tokens Over-Dominate in RL for LLMs" (arXiv:2505.12929),
Sec. 3: for a softmax over ``N`` logits, ``d log pi(o) / d z = e_o - pi`` and

    sqrt(N / (N - 1)) * (1 - pi(o))  <=  ||e_o - pi||_2  <=  sqrt(2) * (1 - pi(o))

(lower bound: the remaining mass ``1 - pi(o)`` spread evenly over the other ``N - 1`` tokens; upper:
all of it on one token).  Low-probability tokens therefore receive the largest gradients; this
module measures that on a real model and plots it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

__all__ = ["grad_norm_bounds", "token_grad_norms", "plot_grad_norm_vs_prob", "summarize_by_prob_bins"]


def grad_norm_bounds(probs: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lower, upper)`` = ``(sqrt(N/(N-1)) (1-p), sqrt(2) (1-p))`` elementwise."""
    if vocab_size < 2:
        raise ValueError("vocab_size must be >= 2")
    one_minus = 1.0 - probs
    return math.sqrt(vocab_size / (vocab_size - 1)) * one_minus, math.sqrt(2.0) * one_minus


def token_grad_norms(
    logits: torch.Tensor, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None, *, method: str = "autograd"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability of each taken token and the L2 norm of ``d log pi(token) / d logits`` at its position.

    ``logits [..., N]``, ``tokens [...]``; returns flat ``(probs, norms)`` over the positions selected by
    ``mask`` (all if ``None``).  ``method="autograd"`` differentiates the real log-softmax (each position's
    log-prob depends only on its own logits row, so one backward of the sum yields every per-token
    gradient); ``method="analytic"`` uses ``||e_o - pi||^2 = 1 - 2 pi_o + sum_j pi_j^2``.
    """
    logits = logits.detach().to(torch.float64)
    if method == "autograd":
        z = logits.clone().requires_grad_(True)
        logp = torch.log_softmax(z, -1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
        (grad,) = torch.autograd.grad(logp.sum(), z)
        norms = grad.norm(dim=-1)
        probs = logp.detach().exp()
    elif method == "analytic":
        p = torch.softmax(logits, -1)
        probs = p.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
        norms = (1 - 2 * probs + p.square().sum(-1)).clamp(min=0).sqrt()
    else:
        raise ValueError("method must be 'autograd' or 'analytic'")
    if mask is not None:
        sel = mask.bool()
        return probs[sel], norms[sel]
    return probs.reshape(-1), norms.reshape(-1)


def summarize_by_prob_bins(probs: torch.Tensor, norms: torch.Tensor, edges=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)):
    """Mean gradient norm and token count per probability bin (a text-friendly version of the plot)."""
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (probs >= lo) & ((probs < hi) if hi < 1.0 else (probs <= hi))
        n = int(sel.sum())
        rows.append({"lo": lo, "hi": hi, "count": n, "mean_norm": float(norms[sel].mean()) if n else float("nan")})
    return rows


def plot_grad_norm_vs_prob(
    probs: torch.Tensor, norms: torch.Tensor, vocab_size: int, path: str | Path, *, title: Optional[str] = None
) -> Path:
    """Scatter of per-token gradient norm vs. probability with the paper's two bounds; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    p = probs.detach().cpu().double()
    n = norms.detach().cpu().double()
    grid = torch.linspace(0, 1, 200, dtype=torch.float64)
    lo, hi = grad_norm_bounds(grid, vocab_size)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    ax.scatter(p.numpy(), n.numpy(), s=6, alpha=0.5, label="tokens (real model)")
    ax.plot(grid.numpy(), lo.numpy(), "g--", label=r"$\sqrt{N/(N-1)}\,(1-\pi)$")
    ax.plot(grid.numpy(), hi.numpy(), "r--", label=r"$\sqrt{2}\,(1-\pi)$")
    ax.set_xlabel(r"token probability $\pi(o_t)$")
    ax.set_ylabel(r"$\|\nabla_z \log \pi(o_t)\|_2$")
    ax.set_title(title or f"Per-token gradient norm vs probability (N={vocab_size})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.5)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    """``python -m megatron_pma.rl.diagnostics --out grad_norm_vs_prob.png``: a tiny bigram-style model
    briefly trained on a noisy pattern, its per-token gradient norms, the bounds, and a bin table."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="grad_norm_vs_prob.png")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    v = args.vocab
    model = torch.nn.Sequential(torch.nn.Embedding(v, 32), torch.nn.Tanh(), torch.nn.Linear(32, v))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)

    def sample(n):
        x = torch.randint(0, v, (n,))
        y = torch.where(torch.rand(n) < 0.7, (3 * x + 1) % v, torch.randint(0, v, (n,)))
        return x, y

    for _ in range(args.steps):
        x, y = sample(512)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = sample(2000)
    with torch.no_grad():
        logits = model(x)
    probs, norms = token_grad_norms(logits, y)
    lo, hi = grad_norm_bounds(probs, v)
    print(f"{probs.numel()} tokens, vocab {v}; bounds hold: {bool(((norms >= lo - 1e-9) & (norms <= hi + 1e-9)).all())}")
    for row in summarize_by_prob_bins(probs, norms):
        print(f"  p in [{row['lo']:.1f}, {row['hi']:.1f}): {row['count']:5d} tokens, mean ||grad|| {row['mean_norm']:.3f}")
    print("wrote", plot_grad_norm_vs_prob(probs, norms, v, args.out))


if __name__ == "__main__":
    main()
