"""AR and Lopti (arXiv:2505.12929) for GRPO-style RL: a framework-free core plus per-framework adapters.

* :mod:`megatron_pma.rl.core` — pure torch: :func:`reweight_advantages`, :func:`lopti_masks`,
  :func:`clipped_policy_loss`, :func:`taken_token_logprobs`, :func:`run_lopti_stages`, :class:`LoptiConfig`.
* :mod:`megatron_pma.rl.nemo_rl` — ``LoptiClippedPGLossFn`` (wraps the installed NeMo-RL's own
  ``ClippedPGLossFn``, v0.5-v0.7) and ``LoptiPolicy`` for NeMo-RL.
* :mod:`megatron_pma.rl.verl` — AR loss modes around verl's own losses, Lopti in verl's V1 and legacy
  trainers; :mod:`megatron_pma.rl.verl_config` — verl's typed policy-loss config with ``ar_alpha``.
* :mod:`megatron_pma.rl.nemo_aligner` — a PPO actor loss for NeMo-Aligner 0.7.0.
* :mod:`megatron_pma.rl.diagnostics` — per-token gradient norms vs. probability.

The adapters are imported lazily (``megatron_pma.rl.LoptiClippedPGLossFn`` works without NeMo-RL).
"""

from megatron_pma.rl.core import (
    LOPTI_STAGES,
    LoptiConfig,
    clipped_policy_loss,
    k3_kl,
    lopti_masks,
    masked_aggregate,
    pg_token_losses,
    reweight_advantages,
    run_lopti_stages,
    taken_token_logprobs,
)

_LAZY = {
    # NeMo-RL
    "LoptiClippedPGLossFn": "megatron_pma.rl.nemo_rl",
    "LoptiPolicy": "megatron_pma.rl.nemo_rl",
    # verl
    "register_verl_policy_losses": "megatron_pma.rl.verl",
    "lopti_two_stage_update": "megatron_pma.rl.verl",
    "lopti_trainer_class": "megatron_pma.rl.verl",
    "lopti_update_actor_v1": "megatron_pma.rl.verl",
    # NeMo-Aligner
    "aligner_actor_loss": "megatron_pma.rl.nemo_aligner",
    "lopti_stage_rollout_data": "megatron_pma.rl.nemo_aligner",
    # diagnostics
    "token_grad_norms": "megatron_pma.rl.diagnostics",
    "grad_norm_bounds": "megatron_pma.rl.diagnostics",
    "plot_grad_norm_vs_prob": "megatron_pma.rl.diagnostics",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = [
    "LOPTI_STAGES",
    "LoptiConfig",
    "clipped_policy_loss",
    "k3_kl",
    "lopti_masks",
    "masked_aggregate",
    "pg_token_losses",
    "reweight_advantages",
    "run_lopti_stages",
    "taken_token_logprobs",
    *_LAZY,
]
