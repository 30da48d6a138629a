#!/usr/bin/env bash
# GRPO with Advantage Reweighting and Lopti (Yang et al., arXiv:2505.12929) on verl 0.9.x.
#
# Needs a GPU verl install (vLLM/SGLang rollout) plus megatron-pma importable in the same environment:
#     pip install -e /path/to/megatron-pma --no-deps
# verl imports the modules in VERL_USE_EXTERNAL_MODULES in every process that imports it (driver,
# TaskRunner, workers); our plugin registers the loss modes "ar" / "vanilla_ar" and, with
# MEGATRON_PMA_LOPTI_ETA set, makes the legacy trainer (trainer.use_v1=False) run two actor updates per
# rollout batch. On a multi-node Ray cluster put these variables into the Ray runtime environment.
#
#   AR only:      MEGATRON_PMA_LOPTI_ETA= bash examples/rl/verl_grpo_ar_lopti.sh data.train_files=... ...
#   Lopti only:   AR_ALPHA=0 LOSS_MODE=vanilla_ar bash examples/rl/verl_grpo_ar_lopti.sh ...
#
# Values follow the paper's K&K scripts: clip 0.20/0.24, low-variance KL 0.001, lr 1e-6, 8 rollouts,
# temperature 0.7, token-mean aggregation. Note: verl's KL-loss term is not masked per Lopti stage
# (see megatron_pma/rl/verl.py); the paper's fork masks it, which matters little at coefficient 0.001.
set -euo pipefail

export VERL_USE_EXTERNAL_MODULES=megatron_pma.rl.verl_plugin
export MEGATRON_PMA_AR_ALPHA="${AR_ALPHA:-0.3}"
export MEGATRON_PMA_LOPTI_ETA="${MEGATRON_PMA_LOPTI_ETA-0.5}"

python3 -m verl.trainer.main_ppo \
    trainer.use_v1=False \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    actor_rollout_ref.actor.policy_loss.loss_mode="${LOSS_MODE:-ar}" \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.24 \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=0.7 \
    "$@"
