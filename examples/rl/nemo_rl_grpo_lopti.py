#!/usr/bin/env python
"""GRPO with AR + Lopti (Yang et al., arXiv:2505.12929) on NeMo-RL (github.com/NVIDIA-NeMo/RL).

Run inside a NeMo-RL checkout/environment (GPU cluster, Ray) with megatron-pma installed in the
same environment (``pip install -e /path/to/megatron-pma --no-deps``), so that the Ray policy workers
can unpickle the loss function::

    cd $NEMO_RL_ROOT
    uv run python /path/to/megatron-pma/examples/rl/nemo_rl_grpo_lopti.py \
        --config /path/to/megatron-pma/examples/rl/grpo_lopti_nemo_rl.yaml \
        [hydra-style overrides, e.g. loss_fn.lopti_eta=null policy.model_name=Qwen/Qwen2.5-7B]

The YAML holds only overrides; they are merged over ``--base-config`` (default: NeMo-RL's
``examples/configs/grpo_math_1B.yaml``).  The script is NeMo-RL's math GRPO entry point with two
changes: the loss is :class:`megatron_pma.rl.nemo_rl.LoptiClippedPGLossFn` (AR inside the loss) and the
policy is wrapped in :class:`megatron_pma.rl.nemo_rl.LoptiPolicy` (two update stages per rollout
batch).  The data/environment setup is reused from NeMo-RL's own ``examples/run_grpo_math.py``.
NeMo-RL is not installable from PyPI, so this script is not exercised by the CPU test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pprint
import sys


def _load_nemo_rl_example(root: str):
    path = os.path.join(root, "examples", "run_grpo_math.py")
    spec = importlib.util.spec_from_file_location("nemo_rl_run_grpo_math", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="our overrides YAML (grpo_lopti_nemo_rl.yaml)")
    ap.add_argument("--nemo-rl-root", default=os.environ.get("NEMO_RL_ROOT", os.getcwd()))
    ap.add_argument("--base-config", default=None, help="default: <nemo-rl-root>/examples/configs/grpo_math_1B.yaml")
    args, overrides = ap.parse_known_args()

    from omegaconf import OmegaConf

    from nemo_rl.algorithms.grpo import grpo_train, setup
    from nemo_rl.algorithms.utils import get_tokenizer
    from nemo_rl.distributed.virtual_cluster import init_ray
    from nemo_rl.models.generation import configure_generation_config
    from nemo_rl.utils.config import load_config, parse_hydra_overrides
    from nemo_rl.utils.logger import get_next_experiment_dir

    from megatron_pma.rl.nemo_rl import LoptiClippedPGLossFn, LoptiPolicy

    example = _load_nemo_rl_example(args.nemo_rl_root)  # registers the "mul" resolver, has setup_data
    base = args.base_config or os.path.join(args.nemo_rl_root, "examples", "configs", "grpo_math_1B.yaml")
    config = OmegaConf.merge(load_config(base), OmegaConf.load(args.config))
    if overrides:
        config = parse_hydra_overrides(config, overrides)
    config = OmegaConf.to_container(config, resolve=True)

    # Our two keys are not part of NeMo-RL's loss config: keep them out of its validation.
    lopti_loss_cfg = dict(config["loss_fn"])
    for key in ("advantage_reweight_alpha", "lopti_eta"):
        config["loss_fn"].pop(key, None)
    eta = lopti_loss_cfg.get("lopti_eta")
    pprint.pprint({"loss_fn": lopti_loss_cfg})

    config["logger"]["log_dir"] = get_next_experiment_dir(config["logger"]["log_dir"])
    init_ray()
    tokenizer = get_tokenizer(config["policy"]["tokenizer"])
    config["policy"]["generation"] = configure_generation_config(config["policy"]["generation"], tokenizer)
    dataset, val_dataset, task_to_env, val_task_to_env = example.setup_data(
        tokenizer, config["data"], config["env"], config["grpo"]["seed"]
    )
    (policy, policy_generation, cluster, dataloader, val_dataloader, _loss_fn, logger, checkpointer, grpo_state, master_config) = setup(
        config, tokenizer, dataset, val_dataset
    )

    loss_fn = LoptiClippedPGLossFn(lopti_loss_cfg)  # AR inside the loss; honours the Lopti stage mask
    policy = LoptiPolicy(policy, eta=eta)  # two policy.train stages per rollout batch when eta is set
    print(f"AR alpha={loss_fn.advantage_reweight_alpha}  Lopti eta={eta}", file=sys.stderr)

    grpo_train(
        policy, policy_generation, dataloader, val_dataloader, tokenizer, loss_fn, task_to_env, val_task_to_env,
        logger, checkpointer, grpo_state, master_config,
    )


if __name__ == "__main__":
    main()
