#!/usr/bin/env bash
# GRPO with Advantage Reweighting and Lopti (Yang et al., arXiv:2505.12929) on verl 0.9.x, V1 trainer
# (trainer.use_v1=true, verl 0.9.1's default).
#
# Needs a GPU verl install (vLLM/SGLang rollout) plus megatron-pma installed in the same environment
# (`pip install --no-deps /path/to/megatron-pma`): its `verl.plugins` entry point makes every verl process
# register the loss modes "ar" / "vanilla_ar" and wrap the trainer's actor update for Lopti.
# Everything is set through verl's own config:
#   - AR: policy_loss._target_ = our typed PolicyLossConfig subclass, which adds `ar_alpha`
#         (and `ar_base_loss_mode`, the verl loss AR wraps: vanilla by default);
#   - Lopti: `lopti_eta` in the sync trainer's own config slot trainer.v1.sync (null = off). verl's actor
#         loss then masks the policy gradient, the KL loss and the entropy bonus by the token group while
#         normalising over the full response (the official AR-Lopti code's behaviour).
#
#   AR only:      LOPTI_ETA=null bash examples/rl/verl_grpo_ar_lopti.sh data.train_files=... ...
#   Lopti only:   AR_ALPHA=0 bash examples/rl/verl_grpo_ar_lopti.sh ...
#
# Values follow the paper's K&K scripts: clip 0.20/0.24, low-variance KL 0.001, lr 1e-6, 8 rollouts,
# temperature 0.7, token-mean aggregation (Lopti needs it).
set -euo pipefail

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    actor_rollout_ref.actor.policy_loss._target_=megatron_pma.rl.verl_config.ARPolicyLossConfig \
    actor_rollout_ref.actor.policy_loss.loss_mode=ar \
    +actor_rollout_ref.actor.policy_loss.ar_alpha="${AR_ALPHA:-0.3}" \
    +trainer.v1.sync.lopti_eta="${LOPTI_ETA:-0.5}" \
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
