"""PMA during Megatron-Bridge training: a Bridge callback that merges after every persistent save.

    from megatron.bridge.training.pretrain import pretrain
    from megatron_pma.training.bridge import PMACallback

    pretrain(cfg, forward_step, callbacks=[PMACallback(num_models=10, method="sma")])

Merges land in ``<cfg.checkpoint.save>/pma/iter_XXXXXXX`` (``output_root=`` to change it). The
keyword arguments are :class:`megatron_pma.training.PMAHook`'s: the callback drives one hook, so
merges run in the same niced background child process, never block training, coalesce when saves
come faster than merges, and never raise into training.

Where it hooks in (megatron-bridge >= 0.5.1; read in 0.6.2's ``training/checkpointing.py`` and
``training/train.py``):

* Bridge fires ``on_checkpoint_save`` at the end of its own ``save_checkpoint``, after rank 0 has
  written the save dir's trackers (``latest_train_state.pt``, then ``latest_checkpointed_iteration.txt``):
  directly for a synchronous save, as a finalize function of the save request for an asynchronous
  one (run when Bridge finalizes the save, possibly steps later). It fires on every rank, for
  non-persistent saves too, and its context carries neither the iteration nor the directory.
* So the callback acts on global rank 0 only, takes the save dir from
  ``context.state.cfg.checkpoint.save`` and the iteration from that dir's tracker -- not from
  ``state.train_state.step``, which has moved on when an async save finalizes.
* Non-persistent saves (local, or global into ``<save>/non_persistent`` or
  ``non_persistent_global_ckpt_dir``) do not write that tracker: an event whose tracker names no
  iteration newer than the last one seen (or than the one found at ``on_train_start``) is skipped.
* ``on_train_end`` fires after Bridge finalized every async save (blocking); the callback closes the
  hook there, which waits for the last merge. (A run that leaves through Bridge's exit conditions
  calls ``sys.exit`` before ``on_train_end``: the merge in flight is then abandoned, never published.)

Save dirs on an object store (Bridge's multi-storage client, ``msc://``) are not supported: the
merge reads local files.

Keep ``cfg.checkpoint.most_recent_k`` (Bridge deletes older ``iter_*`` folders) at -1 or at least the
window the merge needs: ``num_models`` checkpoints, more with ``interval_iters`` spacing.

No import of megatron.bridge: Bridge's ``CallbackManager.add`` registers any object's ``on_*``
methods whose name is one of its events, so this class needs no Bridge base class.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("megatron_pma.training.bridge")


def global_rank() -> int:
    """The process's global rank, as Bridge's ``get_rank_safe``: torch.distributed once it is
    initialized, else ``$RANK`` (0 when unset)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def tracked_iteration(save_dir: os.PathLike | str) -> Optional[int]:
    """The iteration a Bridge save dir's tracker names (``latest_train_state.pt`` first, as Bridge
    loads, then ``latest_checkpointed_iteration.txt``; read by the engine's Bridge layout, through
    the restricted unpickler); None when neither names one (or says "release")."""
    from megatron_pma.layouts import bridge as bridge_layout

    iteration = bridge_layout.LAYOUT.read_tracker(Path(save_dir))
    return iteration if isinstance(iteration, int) else None


class PMACallback:
    """Megatron-Bridge callback: a PMA merge of the newest ``num_models`` checkpoints after every
    persistent checkpoint save, in the background (see the module docstring).

    Args:
        num_models: N, the number of checkpoints in each merge.
        **hook_options: :class:`megatron_pma.training.PMAHook`'s keyword arguments (``method``,
            ``alpha``, ``weights``, ``interval_iters``, ``interval_tokens``, ``tokens_per_iter``,
            ``every``, ``optimizer``, ``output_root``, ``keep_last``, ``nice``, ``threads``,
            ``timeout``, ...).

    ``hook`` is the :class:`PMAHook` (None before the first save and on ranks other than 0).
    """

    def __init__(self, num_models: int, **hook_options: Any):
        if int(num_models) < 1:
            raise ValueError("num_models must be >= 1")
        self.num_models = int(num_models)
        self.hook_options = hook_options
        self.hook = None
        self._last_iteration: Optional[int] = None  # the tracker's iteration at the last event

    # -- Bridge events -------------------------------------------------------------------

    def on_train_start(self, context) -> None:
        """Remember the tracker's iteration (a resumed run's): a save that leaves it unchanged
        is not persistent."""
        self._guarded(self._start, context)

    def on_checkpoint_save(self, context) -> None:
        """Request a merge ending at the tracker's iteration; returns at once."""
        self._guarded(self._saved, context)

    def on_train_end(self, context) -> None:
        """Wait for the last merge and stop the hook."""
        self.close()

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()

    # -- internals -----------------------------------------------------------------------

    def _guarded(self, fn, context) -> None:
        # Bridge's CallbackManager.fire lets exceptions through: they would stop training.
        try:
            if global_rank() == 0:
                fn(context)
        except Exception as e:  # noqa: BLE001 -- PMA never stops training
            logger.warning("PMA: %s ignored: %s: %s", fn.__name__.strip("_"), type(e).__name__, e)

    def _start(self, context) -> None:
        save_dir = context.state.cfg.checkpoint.save
        if save_dir:
            self._last_iteration = tracked_iteration(save_dir)

    def _saved(self, context) -> None:
        save_dir = context.state.cfg.checkpoint.save
        if not save_dir:
            return
        iteration = tracked_iteration(save_dir)
        if iteration is None or (self._last_iteration is not None and iteration <= self._last_iteration):
            logger.info("PMA: %s's tracker names no new iteration (a non-persistent save): no merge", save_dir)
            return
        self._last_iteration = iteration
        if self.hook is None:
            from megatron_pma.training import PMAHook

            self._warn_retention(context.state.cfg.checkpoint)
            self.hook = PMAHook(save_dir, self.num_models, **self.hook_options)
        self.hook.on_checkpoint_saved(iteration)

    def _warn_retention(self, ckpt_cfg) -> None:
        keep = getattr(ckpt_cfg, "most_recent_k", -1)
        if keep is not None and 0 <= keep < self.num_models:
            logger.warning("PMA: checkpoint.most_recent_k=%d keeps fewer checkpoints than num_models=%d: "
                           "merges will be skipped or fail", keep, self.num_models)
