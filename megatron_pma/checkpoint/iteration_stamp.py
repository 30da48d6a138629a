"""Write an output's iteration into the state Megatron resumes from.

A merge keeps the newest input's non-tensor state, so an output named ``iter_0000030`` made of
inputs ending at iteration 20 would still say 20 inside: Megatron would resume at 20 under a
folder (and tracker) saying 30, and its next save could collide. The iteration lives in

- ``common.pt`` (megatron-core <= 0.18) and the DCP byte object ``common_state/shard_0_1``
  (>= 0.19, the bytes of ``torch.save([state_dict])``): ``iteration`` and ``args.iteration``;
- each legacy ``mp_rank_*/model_optim_rng.pt``: the same two fields;
- Megatron-Bridge's ``train_state.pt``: ``step`` (a 0-d tensor).

Only these fields change; everything else (``opt_param_scheduler``, ``args.consumed_train_samples``,
...) stays the newest input's: the run the weights came from. Files are re-pickled with
:mod:`torch_pickle`'s codec, so Megatron's classes inside are never imported and come back
under their own names. Imports torch: only merges whose iteration changes pay for it.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from megatron_pma.checkpoint import torch_pickle


def stamp_state(state, iteration: int | None, drop_optimizer: bool = False) -> bool:
    """Set ``iteration`` and ``args.iteration`` where the state has them (None: leave them); True if
    it had either. ``drop_optimizer``: remove its ``optimizer`` entry (the merge has no optimizer
    state; a loader that reads the entry as "load the optimizer" must not find it)."""
    if drop_optimizer and isinstance(state, dict):
        state.pop("optimizer", None)
    if iteration is None:
        return False
    found = False
    if isinstance(state, dict) and "iteration" in state:
        state["iteration"] = iteration
        found = True
    args = state.get("args") if isinstance(state, dict) else None
    if args is not None and hasattr(args, "iteration"):
        args.iteration = iteration
        found = True
    return found


def stamp_file(path: Path, iteration: int | None, drop_optimizer: bool = False) -> None:
    """Rewrite a ``torch.save`` file of a state dict (``common.pt``) as :func:`stamp_state` says."""
    state, codec = torch_pickle.load(Path(path), mmap=False)
    stamp_state(state, iteration, drop_optimizer)
    _save_as(codec, state, Path(path))


def _save_as(codec, obj, path: Path) -> None:
    """Replace ``path``, saved under its own name (torch names the zip's folder after the file:
    ``common/data.pkl``, as the original)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".stamp-") as td:
        codec.save(obj, Path(td) / path.name)
        os.replace(Path(td) / path.name, path)


def stamp_bytes(blob: bytes, iteration: int | None, drop_optimizer: bool = False) -> bytes:
    """The bytes of a ``torch.save([state_dict])`` (0.19's common state), as :func:`stamp_state` says."""
    import torch

    codec = torch_pickle.Codec()
    obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False, pickle_module=codec.module)
    for state in obj if isinstance(obj, list) else [obj]:
        stamp_state(state, iteration, drop_optimizer)
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_module=codec.module)
    return buf.getvalue()


def stamp_train_state(path: Path, iteration: int) -> None:
    """Megatron-Bridge's ``train_state.pt``: ``step`` (a 0-d tensor, its dtype kept)."""
    import torch

    state, codec = torch_pickle.load(Path(path), mmap=False)
    step = state.get("step") if isinstance(state, dict) else None
    if step is None:
        return
    state["step"] = torch.tensor(iteration, dtype=step.dtype) if isinstance(step, torch.Tensor) else iteration
    _save_as(codec, state, Path(path))
