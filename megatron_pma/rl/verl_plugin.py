"""Importing this module registers megatron-pma's AR policy losses with verl (arXiv:2505.12929) and wraps
verl's trainers' ``_update_actor`` for Lopti (see :func:`megatron_pma.rl.verl.install_lopti_into_verl_trainer`).

verl imports it in every process (driver, TaskRunner, workers): as the ``verl.plugins`` entry point this
package declares, or through ``VERL_USE_EXTERNAL_MODULES=megatron_pma.rl.verl_plugin``.  Then::

    python -m verl.trainer.main_ppo \\
        actor_rollout_ref.actor.policy_loss._target_=megatron_pma.rl.verl_config.ARPolicyLossConfig \\
        actor_rollout_ref.actor.policy_loss.loss_mode=ar +actor_rollout_ref.actor.policy_loss.ar_alpha=0.3 \\
        +trainer.v1.sync.lopti_eta=0.5 ...

(V1 trainer, verl 0.9.1's default).  The legacy trainer (``trainer.use_v1=false``) takes Lopti's eta
from ``MEGATRON_PMA_LOPTI_ETA``; put environment variables into the Ray runtime environment on a
multi-node cluster.
"""

from megatron_pma.rl.verl import install_lopti_into_verl_trainer, register_verl_policy_losses

REGISTERED = register_verl_policy_losses()
LOPTI_INSTALLED = install_lopti_into_verl_trainer()
