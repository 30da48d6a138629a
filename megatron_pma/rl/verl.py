"""verl adapter: AR policy losses registered in verl's policy-loss registry, and a Lopti two-stage update.

Method: Yang et al., "Do Not Let Low-Probability Tokens Over-Dominate in RL for LLMs",
arXiv:2505.12929 (whose official code is a fork of early verl).  Framework: verl
(github.com/volcengine/verl, PyPI ``verl``; written against 0.9.1).  No verl code is copied here; verl is
imported lazily and only its public registry (``register_policy_loss`` / ``get_policy_loss_fn``) and
loss aggregation (``agg_loss``) are used.

Usage::

    from megatron_pma.rl.verl import register_verl_policy_losses
    register_verl_policy_losses()          # adds loss modes "ar" and "vanilla_ar"

    # select it:  actor_rollout_ref.actor.policy_loss.loss_mode=ar
    # Every process that imports verl must register too (Ray workers): set
    #   VERL_USE_EXTERNAL_MODULES=megatron_pma.rl.verl_plugin
    # in the environment (verl imports the listed modules in its __init__; the plugin registers on
    # import), or declare the plugin as a ``verl.plugins`` entry point of the installed package.

Loss modes (both with verl 0.9.1's signature ``fn(old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode="token-mean", config=None, rollout_is_weights=None) -> (loss, metrics)``):

* ``"vanilla_ar"`` — our implementation of verl's PPO clipped loss (asymmetric clip
  ``clip_ratio_low/high``, dual clip ``clip_ratio_c``, log-ratio clamped to +-20, rollout IS weights,
  ``agg_loss`` with ``config.global_batch_info``) with AR strength defaulting to 0: identical to
  ``"vanilla"`` until an alpha is configured.
* ``"ar"`` — the same with AR on, alpha defaulting to 0.2 (the paper's AR-only scripts).

Alpha is resolved per call: ``config.ar_alpha`` or ``config.policy_loss.ar_alpha`` if the config carries
one, else the environment variable ``MEGATRON_PMA_AR_ALPHA`` (propagates to Ray workers through the
runtime env), else the mode's default.

Lopti: :func:`lopti_two_stage_update` replaces the trainer's single ``update_actor(batch)`` call by two
calls on copies of the batch whose advantages are zeroed outside the stage's token group (the response
mask, hence verl's token-count normaliser, is unchanged; ``old_log_probs`` are not recomputed).
Limitation: verl's own KL-loss (``use_kl_loss``) and entropy terms are computed by the actor over the
whole response mask, so with Lopti they are applied in both stages (the official fork masks them to
the group).  Use ``use_kl_in_reward`` or a small ``kl_loss_coef`` (the paper uses 0.001).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Optional

import torch

from megatron_pma.rl.core import lopti_masks, pg_token_losses, reweight_advantages

__all__ = [
    "register_verl_policy_losses",
    "make_ar_policy_loss",
    "lopti_two_stage_update",
    "lopti_trainer_class",
    "install_lopti_into_verl_trainer",
    "apply_advantage_reweighting",
    "AR_ALPHA_ENV",
    "LOSS_MODES",
]

AR_ALPHA_ENV = "MEGATRON_PMA_AR_ALPHA"
LOPTI_ETA_ENV = "MEGATRON_PMA_LOPTI_ETA"
#: loss mode -> default alpha
LOSS_MODES = {"vanilla_ar": 0.0, "ar": 0.2}


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        try:
            val = cfg.get(key, default)
        except Exception:  # noqa: BLE001 - odd config objects
            val = getattr(cfg, key, default)
    else:
        val = getattr(cfg, key, default)
    return default if val is None else val


def resolve_alpha(config: Any, default: float) -> float:
    """AR alpha for one call: config ``ar_alpha`` > ``policy_loss.ar_alpha`` > env var > ``default``."""
    val = _cfg_get(config, "ar_alpha")
    if val is None:
        val = _cfg_get(_cfg_get(config, "policy_loss"), "ar_alpha")
    if val is None and os.environ.get(AR_ALPHA_ENV, "").strip():
        val = float(os.environ[AR_ALPHA_ENV])
    alpha = float(default if val is None else val)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"AR alpha must be in [0, 1], got {alpha}")
    return alpha


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / (mask.sum() + 1e-8)


def make_ar_policy_loss(default_alpha: float) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """Build a verl policy-loss function with AR (arXiv:2505.12929) and the given default alpha."""

    def ar_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Optional[Any] = None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from verl.trainer.ppo.core_algos import agg_loss

        if config is None:
            raise ValueError("config (the actor config) is required")
        clip = _cfg_get(config, "clip_ratio", 0.2)
        eps_low = _cfg_get(config, "clip_ratio_low", clip)
        eps_high = _cfg_get(config, "clip_ratio_high", clip)
        c = _cfg_get(config, "clip_ratio_c", 3.0)
        if not c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {c}")
        alpha = resolve_alpha(config, default_alpha)

        old = old_log_prob.detach()
        adv = reweight_advantages(advantages, old, alpha) if alpha > 0 else advantages
        log_ratio = (log_prob - old).clamp(min=-20.0, max=20.0)
        pg, _, clipped, dual_hit = pg_token_losses(log_ratio, adv, eps_low, eps_high, c)
        if rollout_is_weights is not None:
            pg = pg * rollout_is_weights
        batch_info = _cfg_get(config, "global_batch_info", {}) or {}
        loss = agg_loss(loss_mat=pg, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **dict(batch_info))
        with torch.no_grad():
            mask = response_mask.to(torch.float32)
            metrics = {
                "actor/pg_clipfrac": _masked_mean(clipped.float(), mask).item(),
                "actor/ppo_kl": _masked_mean(-log_ratio.detach().float(), mask).item(),
                "actor/pg_clipfrac_lower": _masked_mean(dual_hit.float(), mask).item(),
                "actor/ar_alpha": alpha,
            }
            if alpha > 0:
                metrics["actor/ar_weight_mean"] = _masked_mean(
                    (alpha * old.float().exp() + 1 - alpha), mask
                ).item()
        return loss, metrics

    ar_policy_loss.__name__ = f"ar_policy_loss_alpha{default_alpha}"
    return ar_policy_loss


def register_verl_policy_losses(modes: Optional[dict[str, float]] = None) -> list[str]:
    """Register the AR loss modes with verl's ``register_policy_loss`` (idempotent).

    ``modes`` maps loss-mode name -> default alpha (default :data:`LOSS_MODES`).  Returns the names.
    Afterwards ``verl.trainer.ppo.core_algos.get_policy_loss_fn(name)`` returns our function.
    """
    from verl.trainer.ppo import core_algos

    registry = getattr(core_algos, "POLICY_LOSS_REGISTRY", None)
    names = []
    for name, alpha in (modes or LOSS_MODES).items():
        if registry is not None and name in registry and getattr(registry[name], "_megatron_pma", False):
            names.append(name)
            continue
        fn = make_ar_policy_loss(alpha)
        fn._megatron_pma = True  # type: ignore[attr-defined]
        if registry is not None and name in registry:
            raise ValueError(f"verl already has a different policy loss named {name!r}")
        core_algos.register_policy_loss(name)(fn)
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# Driver-side helpers
# --------------------------------------------------------------------------------------------------


def _tensors(batch: Any):
    """The tensor container of a verl ``DataProto`` (its ``.batch`` TensorDict) or a plain mapping."""
    return batch.batch if hasattr(batch, "batch") and hasattr(batch, "meta_info") else batch


def _with_tensor(batch: Any, key: str, value: torch.Tensor) -> Any:
    """A shallow copy of ``batch`` with ``key`` replaced; other tensors are shared, not copied."""
    if hasattr(batch, "batch") and hasattr(batch, "meta_info"):
        new = copy.copy(batch)
        new.batch = batch.batch.clone(recurse=False) if hasattr(batch.batch, "clone") else dict(batch.batch)
        new.batch[key] = value
        new.meta_info = dict(batch.meta_info)
        return new
    if hasattr(batch, "clone") and not isinstance(batch, torch.Tensor):
        new = batch.clone(recurse=False)
    else:
        new = copy.copy(batch)
    new[key] = value
    return new


def apply_advantage_reweighting(
    batch: Any, alpha: float, *, adv_key: str = "advantages", old_key: str = "old_log_probs"
) -> Any:
    """Driver-side AR, as the paper's code does it: once per rollout batch, right after advantage
    estimation (use this *or* the ``"ar"`` loss mode, not both).  Returns a new batch."""
    t = _tensors(batch)
    return _with_tensor(batch, adv_key, reweight_advantages(t[adv_key], t[old_key], alpha))


def lopti_two_stage_update(
    batch: Any,
    update_actor: Callable[[Any], Any],
    eta: Optional[float],
    *,
    low_first: bool = True,
    skip_empty: bool = False,
    adv_key: str = "advantages",
    mask_key: str = "response_mask",
    old_key: str = "old_log_probs",
) -> Any:
    """Lopti (arXiv:2505.12929, Sec. 4.2) around verl's ``update_actor``.

    In the PPO trainer replace ``actor_output = self.actor_rollout_wg.update_actor(batch)`` by
    ``actor_output = lopti_two_stage_update(batch, self.actor_rollout_wg.update_actor, eta=0.5)``.

    Groups come from ``batch[old_key]`` (``exp(old_log_probs) < eta``) within ``batch[mask_key]`` and
    are fixed for both stages; each stage gets a shallow copy of the batch whose advantages are zeroed
    outside the group, so the policy-gradient term only moves that group while verl's normaliser
    (computed from the unchanged response mask) stays the full response.  ``old_log_probs`` are not
    recomputed, so stage 2's ratio includes stage 1's drift.  With ``eta=None`` this is just
    ``update_actor(batch)``.

    Returns the last stage's output; when outputs carry ``meta_info["metrics"]`` (verl's ``DataProto``)
    the metrics of every stage are added under ``lopti/<stage>/<name>``.  The per-stage outputs are in
    ``.meta_info["lopti_stage_outputs"]`` when available.
    """
    if eta is None:
        return update_actor(batch)
    t = _tensors(batch)
    low, high = lopti_masks(t[old_key], t[mask_key], eta)
    stages = [("low", low), ("high", high)]
    if not low_first:
        stages.reverse()
    adv = t[adv_key]
    outputs = []
    for name, stage in stages:
        if skip_empty and not bool(stage.any()):
            continue
        staged = _with_tensor(batch, adv_key, adv * stage.to(adv.dtype))
        outputs.append((name, update_actor(staged)))
    if not outputs:
        return None
    last = outputs[-1][1]
    meta = getattr(last, "meta_info", None)
    if isinstance(meta, dict):
        metrics = dict(meta.get("metrics", {}))
        for name, out in outputs:
            for k, v in getattr(out, "meta_info", {}).get("metrics", {}).items():
                metrics[f"lopti/{name}/{k}"] = v
        meta["metrics"] = metrics
        meta["lopti_stage_outputs"] = {name: out for name, out in outputs}
    return last


def lopti_trainer_class(base: Optional[type] = None, eta: Optional[float] = 0.5, *, low_first: bool = True) -> type:
    """A subclass of verl's (legacy, ``trainer.use_v1=False``) ``RayPPOTrainer`` whose
    ``_update_actor(batch)`` runs :func:`lopti_two_stage_update`.  ``base`` defaults to
    ``verl.trainer.ppo.ray_trainer.RayPPOTrainer``; any class with an ``_update_actor(batch)`` method works."""
    if base is None:
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer as base  # noqa: N813

    def _update_actor(self, batch):
        parent = super(cls, self)._update_actor
        return lopti_two_stage_update(batch, parent, eta, low_first=low_first)

    cls = type(f"Lopti{base.__name__}", (base,), {"_update_actor": _update_actor, "lopti_eta": eta})
    cls.__doc__ = f"{base.__name__} with Lopti (eta={eta}): two actor updates per rollout batch (arXiv:2505.12929)."
    return cls


def install_lopti_into_verl_trainer(eta: Optional[float], *, low_first: bool = True) -> bool:
    """Patch verl's legacy ``RayPPOTrainer._update_actor`` in this process to run Lopti's two stages.

    Used by :mod:`megatron_pma.rl.verl_plugin` when ``MEGATRON_PMA_LOPTI_ETA`` is set, so that the
    unmodified ``python -m verl.trainer.main_ppo trainer.use_v1=False ...`` entry point gets Lopti in its
    TaskRunner process.  Idempotent; ``eta=None`` restores the original method.  Returns True if patched.
    """
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    original = getattr(RayPPOTrainer, "_megatron_pma_original_update_actor", RayPPOTrainer._update_actor)
    RayPPOTrainer._megatron_pma_original_update_actor = original
    if eta is None:
        RayPPOTrainer._update_actor = original
        return False

    def _update_actor(self, batch):
        return lopti_two_stage_update(batch, lambda b: original(self, b), eta, low_first=low_first)

    RayPPOTrainer._update_actor = _update_actor
    return True
