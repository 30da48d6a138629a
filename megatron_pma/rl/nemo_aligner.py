"""NeMo-Aligner adapter: an AR/Lopti-aware PPO actor loss (arXiv:2505.12929).

NeMo-Aligner 0.7.0 (github.com/NVIDIA/NeMo-Aligner, unmaintained since 2025) has no GRPO, but its PPO
actor (``nemo_aligner/models/nlp/gpt/megatron_gpt_ppo_actor.py``) builds the clipped surrogate in
``get_actor_forward_output_and_loss_func().loss_func``.  ``patches/nemo-aligner/0001-lopti-ar-actor-loss.patch``
makes that function call :func:`aligner_actor_loss` and makes the PPO trainer
(``nemo_aligner/algorithms/ppo.py``) run the update once per Lopti stage (:func:`lopti_stage_rollout_data`).

Tensor layout (as the actor's ``loss_func`` receives it, micro-batch of ``B`` responses padded to
``S`` tokens): ``response_tokens [B, S]``; ``curr_log_probs``, ``prev_logprobs``, ``advantages``,
``mask`` ``[B, S-1]`` (log-probs of token ``t+1`` given the prefix); ``is_end [B]`` (the response ended
properly; others are excluded from the loss).  No NeMo-Aligner code is copied; nothing here imports
NeMo / NeMo-Aligner.

Config keys read by the patch from ``model.ppo``: ``advantage_reweight_alpha`` (AR, default 0 = off)
and ``lopti_eta`` (default ``None`` = off).  With both off the loss equals NeMo-Aligner's.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from megatron_pma.rl.core import lopti_masks, pg_token_losses, reweight_advantages

__all__ = ["aligner_actor_loss", "lopti_entropy_weighting", "lopti_stage_rollout_data", "STAGE_MASK_KEY"]

#: Key of the Lopti stage mask in the PPO rollout / micro-batch dict (``[B, S-1]``, like ``mask``).
STAGE_MASK_KEY = "lopti_stage_mask"


def aligner_actor_loss(
    curr_log_probs: torch.Tensor,
    batch: Mapping[str, Any],
    ratio_eps: float,
    *,
    alpha: float = 0.0,
    scaled_entropy: Optional[torch.Tensor] = None,
    ratio_eps_high: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO actor loss of NeMo-Aligner with Advantage Reweighting and a Lopti stage mask.

    ``loss = sum(max(-A' r, -A' clip(r, 1-eps, 1+eps_high)) * is_end_mask * stage) / sum(is_end_mask)
    - scaled_entropy`` with ``is_end_mask = mask * is_end[:, None]``, ``A'`` the AR-reweighted
    advantages (``alpha = 0``: unchanged) and ``stage = batch[STAGE_MASK_KEY]`` if present (normaliser
    unchanged).  If no token is valid the loss is ``0 * loss`` of the first token (NeMo-Aligner's way
    of keeping the graph).  Returns ``(loss, ppo_ratio, ppo_ratio_clamped)``; the two ratio metrics
    are detached means over ``mask`` as in NeMo-Aligner.
    """
    mask = batch["mask"]
    advantages = batch["advantages"]
    prev = batch["prev_logprobs"]
    is_end_mask = mask * batch["is_end"].view(-1, 1)
    eps_high = ratio_eps if ratio_eps_high is None else ratio_eps_high
    if alpha:
        advantages = reweight_advantages(advantages, prev, alpha)
    pg, ratios, _, _ = pg_token_losses(curr_log_probs - prev, advantages, ratio_eps, eps_high)
    stage = batch.get(STAGE_MASK_KEY) if hasattr(batch, "get") else None
    num_mask = is_end_mask if stage is None else is_end_mask * stage.to(is_end_mask.dtype)
    denom = is_end_mask.sum()
    if denom > 0:
        actor_loss = (pg * num_mask).sum() / denom
        loss = actor_loss if scaled_entropy is None else actor_loss - scaled_entropy
    else:
        loss = pg.reshape(-1)[0] * 0
    with torch.no_grad():
        mbool = mask.bool()
        ppo_ratio = ratios.detach()[mbool].mean()
        ppo_ratio_clamped = ratios.detach().clamp(1 - ratio_eps, 1 + eps_high)[mbool].mean()
    return loss, ppo_ratio, ppo_ratio_clamped


def lopti_entropy_weighting(batch: Mapping[str, Any], is_end_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(mask, scale)`` for NeMo-Aligner's entropy bonus under a Lopti stage: its
    ``calculate_distributed_entropy(logits, mask)`` is a mean over ``mask``; times ``scale`` it becomes
    the sum over the stage's tokens divided by the full ``is_end_mask`` count (the official AR-Lopti
    code: terms masked by group, normalised over the full mask), so the two stages' bonuses add up to
    the one-stage bonus.  No stage: ``(is_end_mask, 1.0)``; an empty stage: scale 0 (no bonus)."""
    stage = batch.get(STAGE_MASK_KEY) if hasattr(batch, "get") else None
    if stage is None:
        return is_end_mask, 1.0
    mask = is_end_mask * stage.to(is_end_mask.dtype)
    n_stage = mask.sum()
    if n_stage == 0:
        return is_end_mask, 0.0
    return mask, n_stage / is_end_mask.sum()


def lopti_stage_rollout_data(
    ppo_rollout_data: Mapping[str, torch.Tensor], eta: Optional[float], *, low_first: bool = True
) -> list[tuple[Optional[str], dict]]:
    """Split one PPO rollout batch into the Lopti stages (low-probability tokens first).

    Each stage is a shallow copy of ``ppo_rollout_data`` plus ``STAGE_MASK_KEY``; the groups come from
    ``prev_logprobs`` (not recomputed between stages) within ``mask``.  ``eta=None``: one stage,
    the data unchanged.
    """
    if eta is None:
        return [(None, dict(ppo_rollout_data))]
    low, high = lopti_masks(ppo_rollout_data["prev_logprobs"], ppo_rollout_data["mask"], eta)
    stages = [("low", low), ("high", high)]
    if not low_first:
        stages.reverse()
    dtype = ppo_rollout_data["mask"].dtype
    return [(name, {**ppo_rollout_data, STAGE_MASK_KEY: m.to(dtype)}) for name, m in stages]
