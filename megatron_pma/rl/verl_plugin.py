"""Importing this module registers megatron-pma's AR policy losses with verl (arXiv:2505.12929),
and, if ``MEGATRON_PMA_LOPTI_ETA`` is set, patches verl's legacy ``RayPPOTrainer._update_actor`` to run
Lopti's two update stages.

verl imports the modules listed in ``VERL_USE_EXTERNAL_MODULES`` when it is imported, in every process
(driver, TaskRunner, workers), so::

    export VERL_USE_EXTERNAL_MODULES=megatron_pma.rl.verl_plugin
    export MEGATRON_PMA_AR_ALPHA=0.3        # optional: alpha for loss_mode=ar / vanilla_ar
    export MEGATRON_PMA_LOPTI_ETA=0.5       # optional: Lopti (legacy trainer, trainer.use_v1=False)
    python -m verl.trainer.main_ppo actor_rollout_ref.actor.policy_loss.loss_mode=ar trainer.use_v1=False ...

(on a multi-node Ray cluster put these variables into the Ray runtime environment).
"""

import os

from megatron_pma.rl.verl import LOPTI_ETA_ENV, install_lopti_into_verl_trainer, register_verl_policy_losses

REGISTERED = register_verl_policy_losses()

_eta = os.environ.get(LOPTI_ETA_ENV, "").strip()
LOPTI_INSTALLED = False
if _eta and _eta.lower() != "none":
    try:
        LOPTI_INSTALLED = install_lopti_into_verl_trainer(float(_eta))
    except ImportError as exc:  # worker processes of a partial verl install: only the trainer needs it
        import warnings

        warnings.warn(f"megatron-pma: Lopti not installed into verl's RayPPOTrainer ({exc})", stacklevel=1)
