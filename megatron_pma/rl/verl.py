"""verl adapter: AR around verl's own policy losses, and Lopti's two-stage update in verl's trainers.

Method: Yang et al., "Do Not Let Low-Probability Tokens Over-Dominate in RL for LLMs",
arXiv:2505.12929 (whose official code is a fork of early verl).  Framework: verl
(github.com/volcengine/verl, PyPI ``verl``; written against 0.9.1).  verl is imported lazily; its public
registry (``register_policy_loss`` / ``get_policy_loss_fn``) and trainers are used, never copied.

AR — loss modes registered in verl's policy-loss registry (verl 0.9.1 signature ``fn(old_log_prob,
log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None)
-> (loss, metrics)``).  Each reweights the advantages by ``alpha * exp(old_log_prob) + 1 - alpha`` and
calls verl's own registered loss (``vanilla`` unless ``policy_loss.ar_base_loss_mode`` names another),
so loss, gradient and metrics are verl's:

* ``"ar"`` — alpha defaults to 0.2 (the paper's AR-only scripts);
* ``"vanilla_ar"`` — alpha defaults to 0: exactly verl's ``vanilla`` until an alpha is configured.

Alpha per call: ``policy_loss.ar_alpha`` (verl's typed config, see :mod:`megatron_pma.rl.verl_config`)
> the environment variable ``MEGATRON_PMA_AR_ALPHA`` > the mode's default.

Lopti — two actor updates per rollout batch, groups fixed by ``old_log_probs``:

* V1 trainer (``trainer.use_v1=true``, verl 0.9.1's default; batches live in TransferQueue):
  :func:`lopti_update_actor_v1` writes the stage's group as ``response_mask`` before each update and
  restores it afterwards.  verl's actor loss (``verl.workers.utils.losses.ppo_loss``) masks the policy
  gradient, the KL loss and the entropy bonus with ``response_mask`` while its token normaliser
  (``batch_num_tokens``) counts ``loss_mask``, which stays the full response: the official AR-Lopti
  code's behaviour (terms masked by group, normalised over the full mask).  ``eta`` comes from the
  trainer's own config slot ``trainer.v1.<trainer_mode>.lopti_eta`` (e.g.
  ``+trainer.v1.sync.lopti_eta=0.5``), else ``MEGATRON_PMA_LOPTI_ETA``; needs ``loss_agg_mode=token-mean``.
* Legacy trainer (``trainer.use_v1=false``): :func:`lopti_two_stage_update` zeroes the advantages outside
  the group (its worker path derives the normaliser from ``response_mask``, so the mask cannot be
  restricted there); limitation: verl's KL loss and entropy terms then act on the whole response in
  both stages.  ``eta`` from ``MEGATRON_PMA_LOPTI_ETA``.

:mod:`megatron_pma.rl.verl_plugin` (a ``verl.plugins`` entry point, or ``VERL_USE_EXTERNAL_MODULES``)
registers the losses and installs Lopti into both trainers in every verl process.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Callable, Optional

import torch

from megatron_pma.rl.core import lopti_masks, reweight_advantages

__all__ = [
    "register_verl_policy_losses",
    "make_ar_policy_loss",
    "lopti_two_stage_update",
    "lopti_update_actor_v1",
    "lopti_trainer_class",
    "install_lopti_into_verl_trainer",
    "apply_advantage_reweighting",
    "AR_ALPHA_ENV",
    "LOPTI_ETA_ENV",
    "LOSS_MODES",
]

AR_ALPHA_ENV = "MEGATRON_PMA_AR_ALPHA"
LOPTI_ETA_ENV = "MEGATRON_PMA_LOPTI_ETA"
#: loss mode -> default alpha
LOSS_MODES = {"vanilla_ar": 0.0, "ar": 0.2}
#: ``lopti_eta`` key in verl's per-trainer-mode config slot ``trainer.v1.<mode>``.
LOPTI_ETA_KEY = "lopti_eta"


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    val = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if val is None else val


def _env_float(name: str) -> Optional[float]:
    raw = os.environ.get(name, "").strip()
    return None if not raw or raw.lower() == "none" else float(raw)


def resolve_alpha(config: Any, default: float) -> float:
    """AR alpha for one call: ``config.policy_loss.ar_alpha`` > ``$MEGATRON_PMA_AR_ALPHA`` > ``default``."""
    val = _cfg_get(_cfg_get(config, "policy_loss"), "ar_alpha")
    if val is None:
        val = _env_float(AR_ALPHA_ENV)
    alpha = float(default if val is None else val)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"AR alpha must be in [0, 1], got {alpha}")
    return alpha


def make_ar_policy_loss(default_alpha: float) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """A verl policy loss: AR (arXiv:2505.12929) on the advantages, then verl's own registered loss."""

    def ar_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Optional[Any] = None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from verl.trainer.ppo.core_algos import get_policy_loss_fn

        alpha = resolve_alpha(config, default_alpha)
        base_mode = _cfg_get(_cfg_get(config, "policy_loss"), "ar_base_loss_mode", "vanilla")
        base = get_policy_loss_fn(base_mode)
        if getattr(base, "_megatron_pma", False):
            raise ValueError(f"policy_loss.ar_base_loss_mode={base_mode!r} is an AR mode itself")
        adv = reweight_advantages(advantages, old_log_prob, alpha) if alpha > 0 else advantages
        loss, metrics = base(old_log_prob, log_prob, adv, response_mask, loss_agg_mode, config, rollout_is_weights)
        metrics = dict(metrics)
        metrics["actor/ar_alpha"] = alpha
        if alpha > 0:
            with torch.no_grad():
                mask = response_mask.to(torch.float32)
                weight = alpha * old_log_prob.detach().float().exp() + 1 - alpha
                metrics["actor/ar_weight_mean"] = ((weight * mask).sum() / (mask.sum() + 1e-8)).item()
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
        if registry is not None and name in registry:
            raise ValueError(f"verl already has a different policy loss named {name!r}")
        fn = make_ar_policy_loss(alpha)
        fn._megatron_pma = True  # type: ignore[attr-defined]
        core_algos.register_policy_loss(name)(fn)
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# Legacy trainer (DataProto batches on the driver)
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


def _stage_order(low: torch.Tensor, high: torch.Tensor, low_first: bool) -> list[tuple[str, torch.Tensor]]:
    stages = [("low", low), ("high", high)]
    return stages if low_first else stages[::-1]


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
    """Lopti (arXiv:2505.12929, Sec. 4.2) around the legacy trainer's ``update_actor(batch)``.

    Groups come from ``batch[old_key]`` (``exp(old_log_probs) < eta``) within ``batch[mask_key]`` and
    are fixed for both stages; each stage gets a shallow copy of the batch whose advantages are zeroed
    outside the group, so the policy-gradient term only moves that group while the normaliser
    (from the unchanged response mask) stays the full response.  ``old_log_probs`` are not recomputed,
    so stage 2's ratio includes stage 1's drift.  With ``eta=None`` this is just ``update_actor(batch)``.

    Returns the last stage's output; when outputs carry ``meta_info["metrics"]`` (verl's ``DataProto``)
    the metrics of every stage are added under ``lopti/<stage>/<name>``.
    """
    if eta is None:
        return update_actor(batch)
    t = _tensors(batch)
    low, high = lopti_masks(t[old_key], t[mask_key], eta)
    adv = t[adv_key]
    outputs = []
    for name, stage in _stage_order(low, high, low_first):
        if skip_empty and not bool(stage.any()):
            continue
        outputs.append((name, update_actor(_with_tensor(batch, adv_key, adv * stage.to(adv.dtype)))))
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


# --------------------------------------------------------------------------------------------------
# V1 trainer (batches in TransferQueue, KVBatchMeta on the driver)
# --------------------------------------------------------------------------------------------------


def v1_lopti_eta(trainer: Any) -> Optional[float]:
    """``trainer.v1.<trainer_mode>.lopti_eta`` of the trainer's config, else ``$MEGATRON_PMA_LOPTI_ETA``."""
    v1 = trainer.config.trainer.get("v1", {}) or {}
    mode = v1.get("trainer_mode", "sync")
    eta = (v1.get(mode, {}) or {}).get(LOPTI_ETA_KEY)
    eta = _env_float(LOPTI_ETA_ENV) if eta is None else float(eta)
    if eta is not None and not 0.0 < eta <= 1.0:
        raise ValueError(f"trainer.v1.{mode}.{LOPTI_ETA_KEY} must be in (0, 1], got {eta}")
    return eta


def lopti_update_actor_v1(
    trainer: Any,
    batch: Any,
    metrics: dict,
    update_actor: Callable[[Any, dict], Any],
    eta: Optional[float],
    *,
    low_first: bool = True,
) -> Any:
    """Lopti around the V1 trainer's ``_update_actor(batch, metrics)`` (``batch`` a TransferQueue
    ``KVBatchMeta``): the stage's token group is written as ``response_mask`` before each update and the
    original mask is written back afterwards (also on error).  ``loss_mask`` — verl's normaliser — is not
    touched.  ``metrics`` gets the last stage's actor metrics under their usual names, every stage's under
    ``lopti/<stage>/...`` and the group sizes as ``lopti/<stage>/tokens``.
    """
    if eta is None:
        return update_actor(batch, metrics)
    from tensordict import TensorDict
    from verl.trainer.ppo.v1 import trainer_base
    from verl.workers.utils.padding import response_to_nested

    agg = trainer.config.actor_rollout_ref.actor.get("loss_agg_mode", "token-mean")
    if agg != "token-mean":
        raise ValueError(f"Lopti needs actor.loss_agg_mode=token-mean (the paper's); got {agg!r}")
    tq = trainer_base.tq
    fetched = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["response_mask", "old_log_probs"])
    nested_mask = fetched["response_mask"]
    padded = fetched.to_padded_tensor()
    mask = padded["response_mask"]
    low, high = lopti_masks(padded["old_log_probs"], mask, eta)

    def put_mask(value):
        fields = TensorDict({"response_mask": value}, batch_size=len(batch))
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)

    try:
        for name, stage in _stage_order(low, high, low_first):
            put_mask(response_to_nested(stage.to(mask.dtype), nested_mask))
            stage_metrics: dict = {}
            batch = update_actor(batch, stage_metrics)
            metrics.update(stage_metrics)
            metrics.update({f"lopti/{name}/{k}": v for k, v in stage_metrics.items()})
            metrics[f"lopti/{name}/tokens"] = int(stage.sum())
    finally:
        put_mask(nested_mask)
    return batch


def _is_v1(base: type) -> bool:
    import inspect

    return "metrics" in inspect.signature(base._update_actor).parameters


def lopti_trainer_class(base: Optional[type] = None, eta: Optional[float] = 0.5, *, low_first: bool = True) -> type:
    """A subclass of a verl trainer whose ``_update_actor`` runs Lopti's two stages.  ``base`` defaults to
    the V1 ``PPOTrainerSync``; a legacy ``RayPPOTrainer`` (``_update_actor(batch)``) works too."""
    if base is None:
        from verl.trainer.ppo.v1 import PPOTrainerSync as base  # noqa: N813

    if _is_v1(base):

        def _update_actor(self, batch, metrics):
            return lopti_update_actor_v1(self, batch, metrics, super(cls, self)._update_actor, eta, low_first=low_first)

    else:

        def _update_actor(self, batch):
            return lopti_two_stage_update(batch, super(cls, self)._update_actor, eta, low_first=low_first)

    cls = type(f"Lopti{base.__name__}", (base,), {"_update_actor": _update_actor, "lopti_eta": eta})
    cls.__doc__ = f"{base.__name__} with Lopti (eta={eta}): two actor updates per rollout batch (arXiv:2505.12929)."
    return cls


def _patch(cls: type, make: Callable[[Callable], Callable], enable: bool) -> bool:
    original = cls.__dict__.get("_megatron_pma_original_update_actor", cls.__dict__["_update_actor"])
    cls._megatron_pma_original_update_actor = original
    cls._update_actor = make(original) if enable else original
    return enable


def install_lopti_into_verl_trainer(eta: Optional[float] = None, *, low_first: bool = True) -> dict[str, bool]:
    """Wrap verl's trainers' ``_update_actor`` in this process (idempotent; what the plugin does).

    * V1 ``PPOTrainer`` (every trainer mode): always wrapped; each call reads ``eta`` from the trainer's
      config (:func:`v1_lopti_eta`) and is a plain pass-through when none is set.
    * legacy ``RayPPOTrainer``: wrapped when ``eta`` (here, or ``$MEGATRON_PMA_LOPTI_ETA``) is set;
      ``eta=None`` without the variable restores the original.

    Returns which trainers were wrapped (a trainer module that does not import is skipped).
    """
    eta = _env_float(LOPTI_ETA_ENV) if eta is None else eta
    done = {"v1": False, "legacy": False}
    try:
        from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    except ImportError:
        PPOTrainer = None  # noqa: N806
    if PPOTrainer is not None:

        def make_v1(original):
            def _update_actor(self, batch, metrics):
                return lopti_update_actor_v1(
                    self, batch, metrics, functools.partial(original, self), v1_lopti_eta(self), low_first=low_first
                )

            return _update_actor

        done["v1"] = _patch(PPOTrainer, make_v1, True)
    try:
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    except ImportError:
        RayPPOTrainer = None  # noqa: N806
    if RayPPOTrainer is not None:

        def make_legacy(original):
            def _update_actor(self, batch):
                return lopti_two_stage_update(batch, functools.partial(original, self), eta, low_first=low_first)

            return _update_actor

        done["legacy"] = _patch(RayPPOTrainer, make_legacy, eta is not None)
    return done
