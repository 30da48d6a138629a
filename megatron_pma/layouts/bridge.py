"""Megatron-Bridge save dirs (facts: Bridge 0.6.2 ``training/checkpointing.py``,
``training/utils/checkpoint_utils.py``, ``training/state.py``)::

    <save>/latest_train_state.pt               Bridge's tracker: a copy of the newest train_state.pt
    <save>/latest_checkpointed_iteration.txt   Megatron-LM's tracker, written "for compatibility"
    <save>/iter_XXXXXXX/                       torch_dist files (as Megatron-LM) plus
        run_config.yaml                        the whole ConfigContainer (cfg.to_yaml)
        train_state.pt                         torch.save of 0-d tensors: step, consumed_train_samples, ...
        tokenizer/  modelopt_state/            optional
        hf/                                    optional Hugging Face export of THIS checkpoint

Bridge's loader reads ``latest_train_state.pt`` first, then the ``.txt`` tracker, so a merge
writes both, the train state first (Bridge's own order). ``hf/`` holds the unmerged weights of
the newest input: a merged checkpoint never carries it (``merge_hf_export`` writes a merged one
instead, from every input's ``hf/``). ``fsdp_dtensor`` saves (Megatron-FSDP:
a plain DCP ``.metadata``, no ``metadata.json``) are refused: their tensors are DTensor shards
this engine does not read.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_pma.checkpoint import dcp, publish
from megatron_pma.checkpoint.discovery import TRACKER, iteration_from_name, read_tracker
from megatron_pma.errors import PMAError
from megatron_pma.layouts.base import Layout, StateFn
from megatron_pma.names import HF_EXPORT, TRAIN_STATE, TRAIN_STATE_TRACKER

RUN_CONFIG = "run_config.yaml"


class Bridge(Layout):
    name = "Megatron-Bridge"
    hf_export_subdir = HF_EXPORT

    def owns(self, path: Path) -> bool:
        return _is_file(Path(path) / RUN_CONFIG) or _is_file(Path(path) / TRAIN_STATE)

    def data_dir(self, ckpt: Path) -> Path:
        if _is_fsdp_dtensor(ckpt):
            raise PMAError(f"{ckpt}: an fsdp_dtensor checkpoint (Megatron-FSDP: {dcp.METADATA_FILE}, no "
                           f"{dcp.MEGATRON_METADATA_FILE}); only torch_dist checkpoints can be merged")
        return Path(ckpt)

    def iteration(self, ckpt: Path, state: StateFn) -> int:
        it = iteration_from_name(ckpt)
        if it is None and _is_file(Path(ckpt) / TRAIN_STATE):
            it = read_train_state(Path(ckpt) / TRAIN_STATE).get("step")
        return it if isinstance(it, int) else super().iteration(ckpt, state)

    def tokens(self, ckpt: Path, iteration: int, tokens_per_iter: int | None) -> int | None:
        """``consumed_train_samples`` (train_state.pt; exact under batch-size ramp-up) or the
        iteration times ``global_batch_size``, times ``seq_length`` (both from run_config.yaml)."""
        if tokens_per_iter is not None:
            return iteration * tokens_per_iter
        seq, gbs = tokens_config(Path(ckpt))
        samples = None
        if _is_file(Path(ckpt) / TRAIN_STATE):
            try:
                samples = read_train_state(Path(ckpt) / TRAIN_STATE).get("consumed_train_samples")
            except PMAError:
                samples = None  # e.g. no torch to read it with: the config's numbers still say it
        if isinstance(samples, int) and samples > 0:
            return samples * seq
        return iteration * gbs * seq

    def left_out(self, newest: Path) -> dict[str, str]:
        if (Path(newest) / HF_EXPORT).exists():
            return {HF_EXPORT: "Megatron-Bridge's Hugging Face export of the newest input alone (unmerged "
                               "weights); convert the merged checkpoint, or merge with --merge-hf-export, "
                               "to get merged Hugging Face weights"}
        return {}

    def stamp_iteration(self, stage: Path, iteration: int) -> None:
        """``train_state.pt``'s step says the output's iteration (it becomes the save dir's
        ``latest_train_state.pt``, which Bridge's loader reads first)."""
        state = Path(stage) / TRAIN_STATE
        if state.is_file():
            from megatron_pma.checkpoint import iteration_stamp

            try:
                iteration_stamp.stamp_train_state(state, iteration)
            except Exception as e:
                raise PMAError(f"{state}: cannot rewrite its step ({type(e).__name__}: {e})") from None

    def owns_save_dir(self, save_dir: Path) -> bool:
        save_dir = Path(save_dir)
        if (save_dir / TRAIN_STATE_TRACKER).exists():
            return True
        try:
            entries = list(os.scandir(save_dir))
        except OSError:
            return False
        return any(iteration_from_name(Path(e.name)) is not None and self.owns(Path(e.path)) for e in entries)

    def read_tracker(self, save_dir: Path) -> int | str | None:
        """Either tracker may be missing; when both are there they must agree."""
        txt = read_tracker(save_dir)
        file = Path(save_dir) / TRAIN_STATE_TRACKER
        if not file.exists():
            return txt
        step = read_train_state(file).get("step")
        if not isinstance(step, int):
            raise PMAError(f"{file}: no integer 'step'")
        if txt is not None and txt != step:
            raise PMAError(f"{file} says iteration {step} but {Path(save_dir) / TRACKER} says {txt}: "
                           "the trackers disagree (a save cut between them?); fix or remove one")
        return step

    def is_complete(self, ckpt: Path) -> bool:
        if _is_fsdp_dtensor(ckpt):
            self.data_dir(ckpt)  # raises: a finished save we cannot merge is never skipped silently
        return super().is_complete(ckpt)

    def write_trackers(self, save_dir: Path, iteration: int, output: Path, fsync: bool = True) -> None:
        state = Path(output) / TRAIN_STATE
        if state.is_file():  # the newest input's train state, copied with the merge: its step is ours
            publish.write_file_atomic(Path(save_dir) / TRAIN_STATE_TRACKER, state.read_bytes(), fsync=fsync)
        else:  # never leave an older train state to win over the .txt tracker
            (Path(save_dir) / TRAIN_STATE_TRACKER).unlink(missing_ok=True)
        super().write_trackers(save_dir, iteration, output, fsync)

    def trackers(self) -> tuple[str, ...]:
        return (TRAIN_STATE_TRACKER, TRACKER)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except PermissionError:
        return False


def _is_fsdp_dtensor(ckpt: Path) -> bool:
    """A finished fsdp_dtensor save: DCP metadata and Bridge's train state (written after the
    tensors), but no metadata.json (a torch_dist save writes it before the train state)."""
    ckpt = Path(ckpt)
    return (_is_file(ckpt / dcp.METADATA_FILE) and _is_file(ckpt / TRAIN_STATE)
            and not _is_file(ckpt / dcp.MEGATRON_METADATA_FILE))


def read_train_state(file: Path) -> dict:
    """A ``train_state.pt`` as plain numbers (``TrainState.state_dict`` saves 0-d tensors).

    Read through :mod:`megatron_pma.checkpoint.torch_pickle` (needs torch, which a Bridge run has)."""
    try:
        from megatron_pma.checkpoint import torch_pickle

        state, _ = torch_pickle.load(Path(file), mmap=False)
    except PermissionError:
        raise PMAError(f"{file}: permission denied") from None
    except Exception as e:
        raise PMAError(f"{file}: unreadable train state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise PMAError(f"{file}: not a train state (top level is {type(state).__name__})")
    return {k: v.item() if hasattr(v, "item") else v for k, v in state.items()}


def tokens_config(ckpt: Path) -> tuple[int, int]:
    """(seq_length, global_batch_size) from a checkpoint's run_config.yaml."""
    file = Path(ckpt) / RUN_CONFIG
    if not file.is_file():
        raise PMAError(f"{ckpt}: no {RUN_CONFIG}, so its tokens per iteration are unknown; "
                       "pass --tokens-per-iter")
    try:
        import yaml

        cfg = yaml.safe_load(file.read_text())  # as Bridge's own read_run_config does
    except Exception as e:
        raise PMAError(f"{file}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    section = lambda name: cfg.get(name) if isinstance(cfg, dict) and isinstance(cfg.get(name), dict) else {}
    seq = section("model").get("seq_length") or section("dataset").get("seq_length") \
        or section("dataset").get("sequence_length")
    gbs = section("train").get("global_batch_size")
    if not isinstance(seq, int) or not isinstance(gbs, int):
        raise PMAError(f"{file}: no model.seq_length / train.global_batch_size; pass --tokens-per-iter")
    return seq, gbs


LAYOUT = Bridge()
