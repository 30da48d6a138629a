"""Framework-free core of Advantage Reweighting (AR) and Low-Probability Token Isolation (Lopti).

Reference: Zhihe Yang et al., "Do Not Let Low-Probability Tokens Over-Dominate in RL for LLMs",
arXiv:2505.12929 (2025).

The paper observes that the gradient of ``log pi(o_t)`` with respect to the logits is
``e_{o_t} - pi``, whose norm lies between ``sqrt(N/(N-1)) (1 - pi(o_t))`` and ``sqrt(2) (1 - pi(o_t))``,
so low-probability tokens dominate the policy-gradient update.  It proposes two remedies:

* **AR** rescales each token's advantage by ``alpha * pi_old(o_t) + (1 - alpha)`` (``pi_old`` detached,
  computed once per rollout batch), see :func:`reweight_advantages`.
* **Lopti** splits the response tokens by ``pi_old(o_t) < eta`` and runs the update twice: first on the
  low-probability group, then on the high-probability group, with the old log-probs *not* recomputed
  in between and with the loss normaliser still the full response mask, see :func:`lopti_masks`,
  :func:`run_lopti_stages` and the ``stage_mask`` argument of :func:`clipped_policy_loss`.

Everything here is plain ``torch`` (``torch.distributed`` only for the vocab-parallel log-prob); the
framework adapters (:mod:`megatron_pma.rl.nemo_rl`, :mod:`megatron_pma.rl.verl`,
:mod:`megatron_pma.rl.nemo_aligner`) import their frameworks lazily and call into this module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

__all__ = [
    "LoptiConfig",
    "reweight_advantages",
    "lopti_masks",
    "k3_kl",
    "clipped_policy_loss",
    "pg_token_losses",
    "masked_aggregate",
    "taken_token_logprobs",
    "run_lopti_stages",
    "LOPTI_STAGES",
]

#: Stage names in the order the paper prescribes (low-probability group first).
LOPTI_STAGES = ("low", "high")


@dataclass(frozen=True)
class LoptiConfig:
    """Hyper-parameters of the AR / Lopti policy loss (arXiv:2505.12929).

    Attributes:
        alpha: Advantage Reweighting strength; ``A' = (alpha * pi_old + 1 - alpha) * A``.
            ``0`` turns AR off.  The paper uses 0.3 (K&K puzzles) and 0.1 (math); its scripts use 0.2
            for AR alone.
        eta: Lopti probability threshold; tokens with ``pi_old < eta`` form the low group.  ``None``
            turns Lopti off.  The paper uses 0.5 (0.4 in the Lopti-only script).
        eps_low, eps_high: asymmetric clip range, ratio clamped to ``[1 - eps_low, 1 + eps_high]``
            (the paper's scripts: 0.20 / 0.24).
        dual_clip_c: dual-clip constant ``c > 1`` (Ye et al. 2019, arXiv:1912.09729); for negative
            advantages the per-token loss is capped at ``-c * A``.  ``None`` disables it.
        kl_coef: coefficient of the k3 KL estimator to the reference policy (paper: 0.001).
        token_level: ``True``: mean over all valid tokens of the batch (GRPO as in the paper, no
            per-response length normalisation); ``False``: mean over tokens per sequence, then over
            sequences.
        low_first: Lopti stage order.  The paper shows that updating the high group first hurts; it is
            configurable only for ablations.
    """

    alpha: float = 0.0
    eta: Optional[float] = None
    eps_low: float = 0.2
    eps_high: float = 0.24
    dual_clip_c: Optional[float] = None
    kl_coef: float = 0.0
    token_level: bool = True
    low_first: bool = True

    def __post_init__(self) -> None:
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.eta is not None and not (0.0 < self.eta <= 1.0):
            raise ValueError(f"eta must be in (0, 1] or None, got {self.eta}")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError("eps_low and eps_high must be >= 0")
        if self.eps_low >= 1:
            raise ValueError("eps_low must be < 1 (the ratio's lower bound 1 - eps_low must be positive)")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1:
            raise ValueError(f"dual_clip_c must be > 1 or None, got {self.dual_clip_c}")
        if self.kl_coef < 0:
            raise ValueError("kl_coef must be >= 0")

    @property
    def ar_enabled(self) -> bool:
        return self.alpha > 0

    @property
    def lopti_enabled(self) -> bool:
        return self.eta is not None

    def stages(self) -> tuple[Optional[str], ...]:
        """The update stages one rollout batch goes through: ``(None,)`` without Lopti."""
        if not self.lopti_enabled:
            return (None,)
        return LOPTI_STAGES if self.low_first else tuple(reversed(LOPTI_STAGES))

    def replace(self, **changes: Any) -> "LoptiConfig":
        return replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# AR and Lopti primitives
# --------------------------------------------------------------------------------------------------


def _broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == like.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    return advantages


def reweight_advantages(advantages: torch.Tensor, old_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Advantage Reweighting (AR), arXiv:2505.12929 Sec. 4.1.

    ``A'_t = (alpha * pi_old(o_t) + 1 - alpha) * A_t`` with ``pi_old(o_t) = exp(old_logprobs)``
    detached.  ``advantages`` may be per-sequence ``[B]`` or per-token ``[B, T]``; the result has the
    broadcast shape of ``old_logprobs`` (``[B, T]``).  ``alpha = 0`` returns the advantages broadcast
    unchanged (bit-exact).
    """
    if not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    adv = _broadcast_advantages(advantages, old_logprobs)
    if alpha == 0:
        return adv.expand(torch.broadcast_shapes(adv.shape, old_logprobs.shape))
    p_old = old_logprobs.detach().to(adv.dtype if adv.is_floating_point() else torch.float32).exp()
    weight = p_old.mul(alpha).add_(1.0 - alpha)
    return weight * adv


def lopti_masks(old_logprobs: torch.Tensor, mask: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lopti token groups, arXiv:2505.12929 Sec. 4.2.

    Returns boolean ``(low, high)``: ``low = mask & (exp(old_logprobs) < eta)``, ``high = mask & ~low``.
    The two are disjoint and their union is ``mask``.  Groups are fixed by the rollout-time (old)
    probabilities and must not be recomputed between the two stages.
    """
    if not (0.0 < float(eta) <= 1.0):
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    valid = mask.bool()
    low = valid & (old_logprobs.detach().exp() < eta)
    high = valid & ~low
    return low, high


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's low-variance ``k3`` estimator of KL(pi_theta || pi_ref), per token:
    ``exp(ref - logp) - (ref - logp) - 1`` (always >= 0)."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - log_ratio - 1.0


def masked_aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_level: bool = True,
    numerator_mask: Optional[torch.Tensor] = None,
    normalizer: Optional[torch.Tensor | float] = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` ``[B, T]`` to a scalar.

    ``mask`` defines the normaliser; ``numerator_mask`` (default ``mask``) selects which tokens are
    summed (Lopti passes ``mask * stage_mask`` here so the normaliser stays the full response mask).

    * token level: ``sum(values * numerator_mask) / normalizer`` with ``normalizer`` defaulting to
      ``sum(mask)`` (pass the global valid-token count under data parallelism / micro-batching);
    * sequence level: per sequence ``sum_t(values * numerator_mask) / sum_t(mask)``, then the sum over
      sequences divided by ``normalizer`` (default: the number of sequences with at least one valid
      token).
    """
    mask = mask.to(values.dtype)
    num_mask = mask if numerator_mask is None else numerator_mask.to(values.dtype)
    # torch.where (not multiplication) so that inf/nan in masked-out positions cannot leak in.
    masked = torch.where(num_mask != 0, values * num_mask, torch.zeros((), dtype=values.dtype, device=values.device))
    if token_level:
        if normalizer is None:
            return masked.sum() / mask.sum().clamp(min=1.0)
        return masked.sum() / normalizer
    tokens_per_seq = mask.sum(-1)
    seq_vals = masked.sum(-1) / tokens_per_seq.clamp(min=1.0)
    if normalizer is None:
        normalizer = (tokens_per_seq > 0).to(values.dtype).sum().clamp(min=1.0)
    return seq_vals.sum() / normalizer


def pg_token_losses(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate (to minimise) from ``log_ratio = log pi_theta - log pi_old``.

    ``pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``, and with dual clip
    ``pg = min(pg, -c A)`` where ``A < 0``.  Returns ``(pg, ratio, clipped, dual_hit)`` where
    ``clipped`` marks tokens whose clipped branch was active (no gradient) and ``dual_hit`` tokens
    capped by the dual clip.
    """
    ratio = log_ratio.exp()
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    if dual_clip_c is not None:
        negative = advantages < 0
        cap = -advantages * dual_clip_c
        dual_hit = negative & (pg > cap)
        pg = torch.where(negative, torch.minimum(pg, cap), pg)
    else:
        dual_hit = torch.zeros_like(clipped)
    return pg, ratio, clipped, dual_hit


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: Optional[float] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    token_level: bool = True,
    stage_mask: Optional[torch.Tensor] = None,
    normalizer: Optional[torch.Tensor | float] = None,
    importance_weights: Optional[torch.Tensor] = None,
    kl_weights: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped policy-gradient loss (PPO/GRPO/DAPO style) with AR and a Lopti stage mask.

    Per token ``t`` with ``r_t = exp(logprobs - old_logprobs)`` and ``A_t`` (after AR when
    ``alpha > 0``)::

        pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))
        pg_t = min(pg_t, -c A_t)                    if dual_clip_c is not None and A_t < 0
        pg_t *= importance_weights_t                (optional, e.g. off-policy correction)
        kl_t = kl_coef * kl_weights_t * k3(logprobs_t, ref_logprobs_t)
        loss = aggregate(pg_t + kl_t)

    ``aggregate`` is :func:`masked_aggregate` with normaliser from ``mask`` (or ``normalizer``) and
    numerator over ``mask * stage_mask``: Lopti's stage mask restricts the PG and KL terms to one token
    group *without* changing the normaliser (arXiv:2505.12929, Sec. 4.2).

    Args:
        logprobs: ``[B, T]`` current log-probs of the taken tokens (requires grad).
        old_logprobs: ``[B, T]`` log-probs under the policy that generated the batch (detached).
        advantages: ``[B]`` or ``[B, T]``.
        mask: ``[B, T]`` response mask (bool or float).
        stage_mask: optional ``[B, T]`` mask of the Lopti stage (from :func:`lopti_masks`).
        normalizer: optional global token count (token level) or sequence count (sequence level).
        alpha: AR strength; applied here with ``old_logprobs`` (same as applying it once per batch).

    Returns:
        ``(loss, metrics)`` with detached scalar tensors in ``metrics``: ``pg_loss``, ``kl``,
        ``clipfrac``, ``clipfrac_lower`` (dual clip), ``ratio_mean``, ``approx_kl_old``,
        ``stage_token_frac``.
    """
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    old_logprobs = old_logprobs.detach()
    adv = reweight_advantages(advantages, old_logprobs, alpha) if alpha else _broadcast_advantages(advantages, logprobs)
    adv = adv.detach().to(logprobs.dtype)

    log_ratio = logprobs - old_logprobs
    pg, ratio, clipped, dual_hit = pg_token_losses(log_ratio, adv, eps_low, eps_high, dual_clip_c)
    if importance_weights is not None:
        pg = pg * importance_weights.detach()

    num_mask = mask if stage_mask is None else mask * stage_mask.to(mask.dtype)
    pg_loss = masked_aggregate(pg, mask, token_level=token_level, numerator_mask=num_mask, normalizer=normalizer)

    if kl_coef and ref_logprobs is not None:
        kl_tok = k3_kl(logprobs, ref_logprobs.detach())
        if kl_weights is not None:
            kl_tok = kl_tok * kl_weights.detach()
        kl = masked_aggregate(kl_tok, mask, token_level=token_level, numerator_mask=num_mask, normalizer=normalizer)
        loss = pg_loss + kl_coef * kl
    else:
        kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
        loss = pg_loss

    with torch.no_grad():
        fmask = num_mask.to(torch.float32)
        n = fmask.sum().clamp(min=1.0)
        metrics = {
            "pg_loss": pg_loss.detach(),
            "kl": kl.detach(),
            "clipfrac": (clipped.float() * fmask).sum() / n,
            "clipfrac_lower": (dual_hit.float() * fmask).sum() / n,
            "ratio_mean": (ratio.detach().float() * fmask).sum() / n,
            "approx_kl_old": (-log_ratio.detach().float() * fmask).sum() / n,
            "stage_token_frac": fmask.sum() / mask.to(torch.float32).sum().clamp(min=1.0),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# Two-stage driver
# --------------------------------------------------------------------------------------------------


def run_lopti_stages(
    update_fn: Callable[[Optional[torch.Tensor], Optional[str]], Any],
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    eta: Optional[float],
    *,
    low_first: bool = True,
    skip_empty: bool = False,
) -> list[Any]:
    """Run one rollout batch's policy update as Lopti prescribes.

    Computes the groups once from ``old_logprobs`` (never recomputed between stages) and calls
    ``update_fn(stage_mask, stage_name)`` for the low group and then the high group (or the reverse if
    ``low_first=False``).  Each call is expected to run the *full* mini-batch loop of the framework with
    the same old log-probs.  With ``eta=None`` it calls ``update_fn(None, None)`` once (plain update).

    ``skip_empty=True`` skips a stage whose group has no token (saves an update that would only apply
    the KL term; the default keeps the step count constant, which optimizer schedules may rely on).
    Returns the list of ``update_fn`` results in call order.
    """
    if eta is None:
        return [update_fn(None, None)]
    low, high = lopti_masks(old_logprobs, mask, eta)
    order = ((low, "low"), (high, "high")) if low_first else ((high, "high"), (low, "low"))
    results = []
    for stage_mask, name in order:
        if skip_empty and not bool(stage_mask.any()):
            continue
        results.append(update_fn(stage_mask, name))
    return results


# --------------------------------------------------------------------------------------------------
# Log-probs of the taken tokens from (vocab-parallel) logits
# --------------------------------------------------------------------------------------------------

# Upper bound on the float32 scratch memory of the forward pass's log-sum-exp (bytes).
_LSE_SCRATCH_BYTES = 32 * 1024 * 1024


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_logsumexp(logits2d: torch.Tensor, scratch_bytes: int) -> torch.Tensor:
    """Row-wise log-sum-exp in float32 (float64 for float64 input), processed in row chunks so the
    scratch memory stays bounded by ``scratch_bytes``."""
    rows, vocab = logits2d.shape
    acc = _acc_dtype(logits2d.dtype)
    chunk = max(1, scratch_bytes // max(1, vocab * 4))
    if chunk >= rows:
        return torch.logsumexp(logits2d.to(acc), dim=-1)
    out = torch.empty(rows, dtype=acc, device=logits2d.device)
    for start in range(0, rows, chunk):
        out[start : start + chunk] = torch.logsumexp(logits2d[start : start + chunk].to(acc), dim=-1)
    return out


class _TakenTokenLogprob(torch.autograd.Function):
    """``log softmax(logits)[target]`` for logits sharded along the vocabulary over ``group``.

    Forward: local log-sum-exp (chunked), an all-reduce MAX of it, an all-reduce SUM of
    ``exp(lse_local - max)`` to combine, and an all-reduce SUM of the target logit, which only the rank
    owning the target's vocabulary slice contributes.  Only ``[rows]``-sized tensors are communicated and
    no second full-vocabulary tensor is kept.

    Backward needs no communication: ``d logp / d z_j = 1[j = target] - softmax_j`` and the softmax of a
    local slice only needs the global log-sum-exp saved by the forward.  The gradient tensor itself is
    the only vocabulary-sized allocation.
    """

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, scratch_bytes):  # type: ignore[override]
        vocab_local = logits.shape[-1]
        flat = logits.reshape(-1, vocab_local)
        tgt = target.reshape(-1)
        lse = _rows_logsumexp(flat, scratch_bytes)
        local = tgt - vocab_start
        owned = (local >= 0) & (local < vocab_local)
        local_idx = torch.where(owned, local, torch.zeros_like(local))
        tgt_logit = flat.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1).to(lse.dtype)
        tgt_logit = torch.where(owned, tgt_logit, torch.zeros_like(tgt_logit))
        if group is not None and dist.get_world_size(group) > 1:
            gmax = lse.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
            sum_exp = (lse - gmax).exp()
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
            lse = gmax + sum_exp.log()
            dist.all_reduce(tgt_logit, op=dist.ReduceOp.SUM, group=group)
        logp = tgt_logit - lse
        ctx.save_for_backward(logits, lse, local_idx, owned)
        ctx.logits_shape = logits.shape
        return logp.reshape(target.shape)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        logits, lse, local_idx, owned = ctx.saved_tensors
        vocab_local = logits.shape[-1]
        g = grad_out.reshape(-1).to(lse.dtype)
        flat = logits.reshape(-1, vocab_local)
        # grad = g * (onehot - softmax), built in place in one tensor.
        if flat.dtype != lse.dtype:
            grad = flat.to(lse.dtype).sub_(lse.unsqueeze(-1))
        else:
            grad = flat.sub(lse.unsqueeze(-1))
        grad.exp_().mul_(-g.unsqueeze(-1))
        add = torch.where(owned, g, torch.zeros_like(g))
        grad.scatter_add_(-1, local_idx.unsqueeze(-1), add.unsqueeze(-1))
        return grad.to(logits.dtype).reshape(ctx.logits_shape), None, None, None, None


def taken_token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    group: Optional["dist.ProcessGroup"] = None,
    *,
    vocab_start: Optional[int] = None,
    scratch_bytes: int = _LSE_SCRATCH_BYTES,
) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under ``softmax(logits)``, for full or vocab-parallel logits.

    Args:
        logits: ``[..., V_local]``.  With ``group`` set, each rank holds the contiguous vocabulary slice
            ``[vocab_start, vocab_start + V_local)`` (Megatron's vocab-parallel layout; by default
            ``vocab_start = rank_in_group * V_local``).
        tokens: ``[...]`` global token ids (same leading shape as ``logits``).
        group: tensor-parallel process group, or ``None`` for unsharded logits.

    Returns ``[...]`` float32 log-probs (float64 for float64 logits) that are differentiable
    with respect to the local logits.  Every rank returns the same values.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} leading shapes differ")
    if vocab_start is None:
        vocab_start = 0 if group is None else dist.get_rank(group) * logits.shape[-1]
    return _TakenTokenLogprob.apply(logits, tokens.long(), group, int(vocab_start), int(scratch_bytes))


def _reference_taken_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Plain ``log_softmax`` + ``gather`` (materialises the full log-softmax); used by tests."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
