#!/usr/bin/env python
"""GRPO with AR + Lopti (Yang et al., arXiv:2505.12929) on NeMo-RL v0.7 (github.com/NVIDIA-NeMo/RL).

The structure of NeMo-RL v0.7's own ``examples/run_grpo.py`` (config -> Ray -> tokenizer -> data ->
``grpo.setup`` -> trainer) with two changes after ``setup``: the loss is
:class:`megatron_pma.rl.nemo_rl.LoptiClippedPGLossFn` (NeMo-RL's ``ClippedPGLossFn``, wrapped: AR and the
Lopti stage mask transform its inputs) and the policy is :class:`megatron_pma.rl.nemo_rl.LoptiPolicy`
(two ``policy.train`` stages per rollout batch when ``loss_fn.lopti_eta`` is set).  In the v0.7 container
(``nvcr.io/nvidia/nemo-rl:v0.7.0``, NeMo-RL in /opt/nemo-rl) with megatron-pma importable by the Ray
workers (``pip install --no-deps /path/to/megatron-pma`` or the checkout on PYTHONPATH)::

    cd /opt/nemo-rl
    python /path/to/megatron-pma/examples/rl/nemo_rl_grpo_lopti.py \
        [--config examples/rl/grpo_lopti_nemo_rl.yaml] [--nemo-rl-root /opt/nemo-rl] \
        [hydra-style overrides, e.g. loss_fn.lopti_eta=null policy.model_name=Qwen/Qwen2.5-7B-Instruct]

``--config`` (ours) holds only the overrides; it is merged over ``--base-config`` (default: NeMo-RL's
``examples/configs/grpo_math_1B.yaml`` under ``--nemo-rl-root``).  v0.7's pydantic ``ClippedPGLossConfig``
accepts our two extra ``loss_fn`` keys, ``advantage_reweight_alpha`` and ``lopti_eta``.

Versions: the loss and the policy wrapper support NeMo-RL v0.5.0, v0.6.0 and v0.7.0; this entry point
needs v0.7 (its ``setup`` takes a ``MasterConfig`` and returns 13 values).  On v0.5 / v0.6, take that
release's own ``examples/run_grpo_math.py`` (v0.5) or ``examples/run_grpo.py`` (v0.6) and add, right after
``setup(...)``: ``loss_fn = LoptiClippedPGLossFn(config["loss_fn"])`` and
``policy = LoptiPolicy(policy, loss_fn.lopti_eta)`` (their configs are plain dicts, so our two keys can
stay in ``loss_fn``).  Lopti needs the synchronous ``grpo_train``; AR also works with ``async_grpo_train``
and the TransferQueue trainer (``data_plane.enabled``).
"""

from __future__ import annotations

import argparse
import os
import pprint

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "grpo_lopti_nemo_rl.yaml")
BASE_CONFIG = os.path.join("examples", "configs", "grpo_math_1B.yaml")  # relative to the NeMo-RL root


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description="GRPO with AR + Lopti on NeMo-RL v0.7")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="our overrides YAML [%(default)s]")
    parser.add_argument("--nemo-rl-root", default=os.environ.get("NEMO_RL_ROOT", os.getcwd()),
                        help="NeMo-RL checkout / /opt/nemo-rl in its container [$NEMO_RL_ROOT or the current directory]")
    parser.add_argument("--base-config", default=None, help=f"NeMo-RL config to start from [<nemo-rl-root>/{BASE_CONFIG}]")
    return parser.parse_known_args(argv)


def load_master_config(args: argparse.Namespace, overrides: list[str]):
    """NeMo-RL's base config, our overrides YAML, then the command-line overrides -> v0.7 ``MasterConfig``."""
    from omegaconf import OmegaConf

    from nemo_rl.algorithms.grpo import MasterConfig
    from nemo_rl.utils.config import load_config, parse_hydra_overrides

    base = args.base_config or os.path.join(args.nemo_rl_root, BASE_CONFIG)
    config = OmegaConf.merge(load_config(base), load_config(args.config))
    if overrides:
        config = parse_hydra_overrides(config, overrides)
    return MasterConfig(**OmegaConf.to_container(config, resolve=True))


def lopti_loss_and_policy(master_config, policy):
    """Our loss (built from ``master_config.loss_fn``, AR/Lopti keys included) and the wrapped policy.
    Lopti runs two ``policy.train`` calls per rollout batch, which only the synchronous ``grpo_train``
    makes with driver-side data; anything else is refused here, before any training."""
    from megatron_pma.rl.nemo_rl import LoptiClippedPGLossFn, LoptiPolicy

    loss_fn = LoptiClippedPGLossFn(master_config.loss_fn)
    if loss_fn.lopti_eta is not None:
        if (master_config.data_plane or {}).get("enabled", False):
            raise ValueError("loss_fn.lopti_eta: Lopti needs data_plane.enabled=false (grpo_train); AR alone works with it")
        if master_config.grpo.get("async_grpo", {}).get("enabled", False):
            raise ValueError("loss_fn.lopti_eta: Lopti needs grpo.async_grpo.enabled=false (on-policy groups)")
    return loss_fn, LoptiPolicy(policy, eta=loss_fn.lopti_eta)


def select_trainer(master_config):
    """As v0.7's run_grpo.py: the TransferQueue trainer when ``data_plane.enabled``, else ``grpo_train``."""
    if (master_config.data_plane or {}).get("enabled", False):
        from nemo_rl.algorithms.grpo_sync import grpo_train_sync

        return grpo_train_sync
    from nemo_rl.algorithms.grpo import grpo_train

    return grpo_train


def main(argv=None) -> None:
    from nemo_rl.algorithms.grpo import setup
    from nemo_rl.algorithms.utils import get_tokenizer
    from nemo_rl.data.utils import setup_response_data
    from nemo_rl.distributed.virtual_cluster import init_ray
    from nemo_rl.models.generation import configure_generation_config
    from nemo_rl.utils.config import register_omegaconf_resolvers
    from nemo_rl.utils.logger import get_next_experiment_dir

    register_omegaconf_resolvers()
    args, overrides = parse_args(argv)
    config = load_master_config(args, overrides)
    pprint.pprint(config)
    config.logger["log_dir"] = get_next_experiment_dir(config.logger["log_dir"])

    init_ray()  # from here on: a Ray cluster with GPUs
    tokenizer = get_tokenizer(config.policy["tokenizer"])
    megatron_cfg = config.policy.get("megatron_cfg") or {}
    config.policy["generation"] = configure_generation_config(
        config.policy["generation"],
        tokenizer,
        has_refit_draft_weights=bool(config.policy["draft"]["enabled"]),
        trains_mtp=bool(megatron_cfg.get("mtp_num_layers")),
    )
    dataset, val_dataset, task_to_env, val_task_to_env = setup_response_data(tokenizer, config.data, config.env)
    policy_factory = None
    if (config.data_plane or {}).get("enabled", False):
        from nemo_rl.models.policy.tq_policy import TQPolicy

        def policy_factory(**kwargs):
            return TQPolicy(**kwargs, dp_cfg=config.data_plane)

    (policy, policy_generation, _nemo_gym, _cluster, dataloader, val_dataloader, _loss_fn, logger, checkpointer,
     grpo_state, master_config, teacher_worker_groups, alias_to_group_alias) = setup(
        config, tokenizer, dataset, val_dataset, policy_factory=policy_factory
    )
    loss_fn, policy = lopti_loss_and_policy(master_config, policy)
    print(f"AR alpha={loss_fn.advantage_reweight_alpha}  Lopti eta={loss_fn.lopti_eta}", flush=True)

    if master_config.grpo.get("async_grpo", {}).get("enabled", False):
        from nemo_rl.algorithms.grpo import async_grpo_train

        async_grpo_train(
            policy=policy, policy_generation=policy_generation, dataloader=dataloader, val_dataloader=val_dataloader,
            tokenizer=tokenizer, loss_fn=loss_fn, task_to_env=task_to_env, val_task_to_env=val_task_to_env,
            logger=logger, checkpointer=checkpointer, grpo_save_state=grpo_state, master_config=master_config,
            max_trajectory_age_steps=master_config.grpo["async_grpo"]["max_trajectory_age_steps"],
            teacher_worker_groups=teacher_worker_groups, alias_to_group_alias=alias_to_group_alias,
        )
        return
    select_trainer(master_config)(
        policy, policy_generation, dataloader, val_dataloader, tokenizer, loss_fn, task_to_env, val_task_to_env,
        logger, checkpointer, grpo_state, master_config,
    )


if __name__ == "__main__":
    main()
