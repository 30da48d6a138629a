"""verl's typed policy-loss config with AR's settings (arXiv:2505.12929), for verl >= 0.9.

verl validates ``actor_rollout_ref.actor.policy_loss`` into ``PolicyLossConfig``, which rejects unknown
keys; its config system instantiates whatever dataclass ``_target_`` names, so a verl user selects this
subclass and sets our keys through Hydra overrides::

    actor_rollout_ref.actor.policy_loss._target_=megatron_pma.rl.verl_config.ARPolicyLossConfig \\
    actor_rollout_ref.actor.policy_loss.loss_mode=ar \\
    +actor_rollout_ref.actor.policy_loss.ar_alpha=0.3

This module imports verl (import it only where verl is installed).
"""

from dataclasses import dataclass
from typing import Optional

from verl.workers.config.actor import PolicyLossConfig

__all__ = ["ARPolicyLossConfig"]


@dataclass
class ARPolicyLossConfig(PolicyLossConfig):
    """``PolicyLossConfig`` plus AR's strength and the verl loss AR wraps.

    Args:
        ar_alpha: AR strength in [0, 1]; ``None``: the loss mode's default (``ar``: 0.2, ``vanilla_ar``: 0).
        ar_base_loss_mode: the registered verl policy loss that receives the reweighted advantages.
    """

    ar_alpha: Optional[float] = None
    ar_base_loss_mode: str = "vanilla"

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.ar_alpha is not None and not 0.0 <= self.ar_alpha <= 1.0:
            raise ValueError(f"policy_loss.ar_alpha must be in [0, 1], got {self.ar_alpha}")
