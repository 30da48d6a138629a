"""Drives the REAL megatron-core 0.19.2 ``megatron.training.checkpointing.save_checkpoint``
(installed with ``pip install --no-deps --target``) in one CPU process (gloo, world size 1),
with the megatron-pma save hook installed. Run by test_megatron_lm_real.py in a subprocess
whose PYTHONPATH puts the 0.19.2 tree first (the venv's megatron-core is another version).

Test-only shims, needed because this machine has Python 3.11, no triton and no CUDA:
- the modules that import triton at top level (MoE paged_stash ops, SSM ops) are replaced
  by empty stand-ins before import (nothing here uses them);
- ``typing.override`` (3.12) is added as the identity decorator;
- ``megatron_pma.megatron_cpu.apply_cpu_shims`` + ``torch.cuda.get_rng_state`` returning a
  CPU generator state (save_checkpoint records the CUDA RNG state unconditionally).
Nothing in megatron.training.checkpointing itself is stubbed.

usage: python real_megatron_driver.py sync|async SAVE_DIR ITER [ITER ...]
       python real_megatron_driver.py launcher SAVE_DIR <argv for megatron_lm.main>
         (the argv names this file with mode `train` as the training script)
Prints one JSON line with what the hook saw.
"""
import importlib.abc
import importlib.machinery
import json
import os
import sys
import typing
from unittest import mock

_STUB_PREFIX = ("megatron.core.transformer.moe.ops.paged_stash", "megatron.core.ssm.ops.")


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        m = mock.MagicMock(name=spec.name)
        m.__path__ = []
        m.__spec__ = spec
        m.__name__ = spec.name
        return m

    def exec_module(self, module):
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith(_STUB_PREFIX):
            return importlib.machinery.ModuleSpec(name, _StubLoader(), is_package=True)
        return None


def prepare():
    sys.meta_path.insert(0, _StubFinder())
    if not hasattr(typing, "override"):
        typing.override = lambda f: f
    import torch

    from megatron_pma.megatron_cpu import apply_cpu_shims

    apply_cpu_shims()
    if not torch.cuda.is_available():
        torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()


def build_model():
    """The model list passed to save_checkpoint: a real MegatronModule with one parameter and
    a real sharded_state_dict (key ``tiny.weight``)."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.module import MegatronModule

    class Tiny(MegatronModule):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.weight = torch.nn.Parameter(torch.arange(12, dtype=torch.float32).reshape(3, 4))

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return {"weight": ShardedTensor.from_rank_offsets("tiny.weight", self.weight.data,
                                                              replica_id=0)}

    return [Tiny()]


def setup(save_dir, async_save, extra=()):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import mpu, tensor_parallel
    from megatron.training import arguments, global_vars

    mpu.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    argv = sys.argv
    sys.argv = ["driver", "--save", save_dir, "--ckpt-format", "torch_dist", "--no-save-optim",
                "--async-strategy", "mcore"] + (["--async-save"] if async_save else []) + list(extra)
    try:
        args = arguments.parse_args(ignore_unknown_args=True)
    finally:
        sys.argv = argv
    args.use_dist_ckpt = True
    args.use_distributed_optimizer = False
    global_vars.set_args(args)
    return args


FIRED = []  # filled by the hook callback
EVENTS = []  # ("saved", iteration, number of hook calls so far) after each save_checkpoint


def record(iteration, save_dir):
    """The on_saved callback: what the save dir looked like when the hook fired."""
    ck = os.path.join(save_dir, f"iter_{iteration:07d}")
    tracker = os.path.join(save_dir, "latest_checkpointed_iteration.txt")
    FIRED.append({"iteration": iteration, "save_dir": save_dir,
                  "tracker": open(tracker).read().strip(),
                  "complete": os.path.exists(os.path.join(ck, "metadata.json"))})


def save_all(iterations, async_save):
    """Each save goes through the module attribute, the way training.py's
    save_checkpoint_and_time does (through its own rebound name)."""
    import torch
    from megatron.training import async_utils, checkpointing
    from megatron.training import training as training_mod

    model = build_model()
    trackers = []
    tracker = os.path.join(checkpointing.get_args().save, "latest_checkpointed_iteration.txt")

    def read():
        return open(tracker).read().strip() if os.path.exists(tracker) else None

    for it in iterations:
        with torch.no_grad():
            model[0].weight.fill_(float(it))  # each save holds a different value
        training_mod.save_checkpoint(it, model, None, None, 0)
        EVENTS.append(["saved", it, len(FIRED)])
        # async: nothing is final yet -- the tracker must still name the previous save
        trackers.append(read())
        if async_save:
            # what the training loop does between steps, then wait for this save's finalize
            async_utils.maybe_finalize_async_save(blocking=False)
            async_utils.maybe_finalize_async_save(blocking=True)
            trackers.append(read())
    if async_save:
        async_utils.maybe_finalize_async_save(blocking=True, terminate=True)
    return trackers


def save_extra_kinds(last):
    """Saves that must NOT trigger a merge: a non-persistent (global) save and a release save."""
    from megatron.training import checkpointing
    from megatron.training import training as training_mod

    args = checkpointing.get_args()
    args.non_persistent_ckpt_type = "global"
    model = build_model()
    training_mod.save_checkpoint(last + 5, model, None, None, 0, non_persistent_ckpt=True)
    EVENTS.append(["saved-non-persistent", last + 5, len(FIRED)])
    training_mod.save_checkpoint(last + 7, model, None, None, 0, release=True)
    EVENTS.append(["saved-release", last + 7, len(FIRED)])


def main():
    mode, save_dir = sys.argv[1], sys.argv[2]
    rest = sys.argv[3:]
    first_opt = next((i for i, x in enumerate(rest) if x.startswith("--")), len(rest))
    iters = [int(x) for x in rest[:first_opt] if x.isdigit()]
    prepare()
    import megatron.core

    from megatron_pma.training import megatron_lm

    if mode in ("sync", "async"):
        inst = megatron_lm.install(record)
        setup(save_dir, mode == "async")
        trackers = save_all(iters, mode == "async")
        if mode == "sync":
            save_extra_kinds(iters[-1])
        inst.uninstall()
        from megatron.training import checkpointing, training as training_mod
        restored = (checkpointing.save_checkpoint is inst.original_save
                    and training_mod.save_checkpoint is inst.original_save
                    and checkpointing.schedule_async_save is inst.original_schedule)
        print(json.dumps({"fired": FIRED, "events": EVENTS, "trackers": trackers,
                          "restored": restored, "version": megatron.core.__version__}))
    elif mode in ("patched-sync", "patched-async"):
        # megatron.training here is the copy patched with patches/megatron-lm/0001-pma-hook.patch;
        # the --pma-* options go through its own argument parser.
        import megatron_pma.training as pma_training

        class RecordingHook:
            instances = []

            def __init__(self, save_dir, num_models, **kw):
                self.init = {"save_dir": save_dir, "num_models": num_models, **kw}
                self.calls = []
                RecordingHook.instances.append(self)

            def on_checkpoint_saved(self, iteration):
                record(iteration, self.init["save_dir"])
                self.calls.append(iteration)

            def close(self):
                pass

        pma_training.PMAHook = RecordingHook  # what the patch imports lazily
        pma_args = rest[first_opt:]
        args = setup(save_dir, mode == "patched-async", pma_args)
        from megatron.training import checkpointing
        trackers = save_all(iters, mode == "patched-async")
        print(json.dumps({"fired": FIRED, "events": EVENTS, "trackers": trackers,
                          "patched_file": checkpointing.__file__,
                          "hooks": [dict(h.init, calls=h.calls) for h in RecordingHook.instances],
                          "version": megatron.core.__version__}))
    elif mode == "train":
        # Run by the launcher as the training script (`__main__`, via runpy).
        with open(os.environ["PMA_TEST_ARGV_OUT"], "w") as f:
            json.dump(sys.argv, f)
        async_save = "--async" in sys.argv
        setup(save_dir, async_save)
        save_all(iters, async_save)
    elif mode == "launcher":
        class RecordingHook:
            instances = []

            def __init__(self, save_dir, num_models, **kw):
                self.init = {"save_dir": save_dir, "num_models": num_models, **kw}
                self.calls = []
                self.closed = False
                RecordingHook.instances.append(self)

            def on_checkpoint_saved(self, iteration):
                record(iteration, self.init["save_dir"])
                self.calls.append(iteration)

            def close(self):
                self.closed = True

        real = os.environ.get("PMA_TEST_REAL_HOOK") == "1"  # the real PMAHook: real merges
        rc = megatron_lm.main(sys.argv[3:], hook_factory=None if real else RecordingHook)
        hooks = [dict(h.init, calls=h.calls, closed=h.closed) for h in RecordingHook.instances]
        print(json.dumps({"rc": rc, "fired": FIRED, "hooks": hooks,
                          "version": megatron.core.__version__}))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
