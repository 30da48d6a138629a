"""A save dir's complete checkpoints and the merge window among them, whatever its layout."""

from __future__ import annotations

from pathlib import Path

from megatron_pma import schedules
from megatron_pma.checkpoint.discovery import TRACKER, iter_dir_name
from megatron_pma.errors import PMAError
from megatron_pma.layouts.registry import of_save_dir


def list_checkpoints(save_dir: Path, *, up_to_tracker: bool = True) -> list[tuple[int, Path]]:
    """Complete checkpoints of a save dir, oldest first.

    With ``up_to_tracker`` a checkpoint newer than the tracker is skipped: its save is not final.
    A NeMo 2 ``checkpoints/`` dir (no tracker) lists its finished checkpoints by step instead.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        raise PMAError(f"{save_dir}: no such save directory")
    return of_save_dir(save_dir).list_checkpoints(save_dir, up_to_tracker)


def select_window(save_dir: Path, num_models: int, *, interval_iters: int | None = None,
                  interval_tokens: int | None = None, tokens_per_iter: int | None = None,
                  every: int = 1, up_to_iteration: int | None = None) -> list[Path]:
    """The last ``num_models`` complete checkpoints of a save dir, spaced by the interval."""
    layout = of_save_dir(Path(save_dir))
    tracker = layout.read_tracker(save_dir)
    if tracker == "release":
        raise PMAError(f"{Path(save_dir) / TRACKER}: says 'release' (a released model, not a training "
                       "run's checkpoints); give checkpoint dirs explicitly")
    ckpts = list_checkpoints(save_dir)
    if isinstance(tracker, int) and tracker not in {it for it, _ in ckpts}:
        folder = Path(save_dir) / iter_dir_name(tracker)
        if not folder.exists():  # Megatron-LM's --freeze-all-layers saves no weights, yet moves the tracker
            raise PMAError(f"{Path(save_dir) / TRACKER}: names iteration {tracker}, but {folder.name} is "
                           "missing (a save without weights, e.g. Megatron-LM's --freeze-all-layers?); pass "
                           "--up-to-iteration or give checkpoint dirs explicitly")
        raise PMAError(f"{Path(save_dir) / TRACKER}: names iteration {tracker}, but "
                       f"{iter_dir_name(tracker)} is missing or incomplete")
    if not ckpts:
        raise PMAError(f"{save_dir}: no complete checkpoint (iter_XXXXXXX with metadata.json, or a "
                       "finished NeMo 2 checkpoint with weights/metadata.json)")
    iterations = [it for it, _ in ckpts]
    tokens = None
    if interval_tokens is not None:
        tokens = []
        for it, path in ckpts:
            t = layout.tokens(path, it, tokens_per_iter)
            if t is None:
                raise PMAError(f"{path}: cannot tell tokens per iteration ({layout.tokens_hint()}); "
                               "pass --tokens-per-iter")
            tokens.append(t)
    picked = schedules.select_window(iterations, num_models, interval_iters=interval_iters,
                                     interval_tokens=interval_tokens, tokens=tokens, every=every,
                                     up_to_iteration=up_to_iteration)
    return [ckpts[i][1] for i in picked]
