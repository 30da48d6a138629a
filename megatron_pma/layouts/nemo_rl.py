"""NeMo-RL v0.7 checkpoint dirs (GRPO, DPO, SFT, ...), both policy backends.

Facts (``nemo_rl/utils/checkpoint.py``, ``nemo_rl/algorithms/grpo.py``, the Megatron policy worker,
``nemo_rl/models/automodel/checkpoint.py``; see ../shared/facts/megatron-bridge.md)::

    <checkpoint_dir>/step_N/              written as tmp_step_N, renamed when complete
        config.yaml  training_info.json  train_dataloader.pt
        policy/tokenizer/
        policy/weights/                   Megatron backend: a Megatron-Bridge save dir whose only
                                          checkpoint is iter_0000000 (NeMo-RL never advances
                                          Bridge's step) + its trackers; optimizer inside the DCP
        policy/weights/model/             DTensor backend: NeMo Automodel's safetensors
        policy/optimizer/                 DTensor backend: the optimizer (a torch DCP), optional

The step is N of ``step_N``. ``tmp_step_N`` (a save in flight) and ``old_step_N`` (one being
replaced) are skipped in a listing and refused when named. A merge's output is a step folder
too: the newest's config.yaml, training_info.json, train_dataloader.pt and policy/tokenizer/,
and the merged weights (for the Megatron backend with the newest's Bridge trackers). The two
backends are two layouts, so steps of different backends are refused as different layouts.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from megatron_pma.checkpoint import dcp, safetensors_file
from megatron_pma.errors import PMAError
from megatron_pma.layouts.base import Layout, StateFn
from megatron_pma.names import HF_EXPORT

STEP = re.compile(r"^step_(\d+)$")
IN_FLIGHT = re.compile(r"^(?:tmp|old)_step_\d+$")
TRAINING_INFO = "training_info.json"
POLICY, WEIGHTS, OPTIMIZER = "policy", "weights", "optimizer"
BRIDGE_ITER = "iter_0000000"   # the one checkpoint of the Megatron backend's Bridge save dir
MODEL = "model"                # the DTensor backend's weights folder (Automodel's save_model)


def step_root(path: Path) -> Path | None:
    """The ``step_N`` (or in-flight ``tmp_step_N``) folder ``path`` is or is inside of."""
    path = Path(path)
    for p in (path, *list(path.parents)[:3]):
        if (STEP.match(p.name) or IN_FLIGHT.match(p.name)) and (
                _is_file(p / TRAINING_INFO) or _is_dir(p / POLICY)):
            return p
    return None


def backend_of(root: Path) -> str | None:
    weights = Path(root) / POLICY / WEIGHTS
    if _is_dir(weights / MODEL):
        return "dtensor"
    if _is_dir(weights / BRIDGE_ITER):
        return "megatron"
    return None


class NeMoRL(Layout):
    keeps_tracker = False  # tmp_step_N -> step_N renames say which saves are final

    def __init__(self, backend: str, title: str, data_subdir: str, optimizer_subdir: str | None):
        self.backend, self.name, self.data_subdir = backend, f"NeMo-RL ({title} backend)", data_subdir
        self.optimizer_subdir = optimizer_subdir
        # the Megatron backend's iter_0000000 is a Bridge checkpoint: it may hold Bridge's hf/ export
        self.hf_export_subdir = HF_EXPORT if backend == "megatron" else None
        # Megatron backend: get_resume_paths (nemo_rl/utils/checkpoint.py, v0.6-v0.7) loads the
        # optimizer iff iter_0000000/common.pt has an "optimizer" entry
        self.optimizer_flag_in_common_state = optimizer_subdir is None

    def owns(self, path: Path) -> bool:
        root = step_root(path)
        if root is None:
            return False
        backend = backend_of(root)  # an in-flight step may have no weights yet: the first layout takes it
        return backend == self.backend or (backend is None and self is LAYOUTS[0])

    def root(self, path: Path) -> Path:
        return step_root(path) or Path(path)

    def data_dir(self, ckpt: Path) -> Path:
        root = self.root(ckpt)
        if IN_FLIGHT.match(root.name):
            raise PMAError(f"{root}: a NeMo-RL save in flight or being replaced (NeMo-RL renames tmp_step_N to "
                           "step_N when the save completes); give step_N folders")
        data = root / self.data_subdir
        if not _is_dir(data):
            raise PMAError(f"{root}: no {self.data_subdir}/ (an incomplete NeMo-RL step?)")
        return data

    def iteration(self, ckpt: Path, state: StateFn) -> int:
        root = self.root(ckpt)
        m = STEP.match(root.name)
        if m is None:
            raise PMAError(f"{root}: not a NeMo-RL step_N folder, so its step is unknown")
        return int(m.group(1))

    def tokens(self, ckpt: Path, iteration: int, tokens_per_iter: int | None) -> int | None:
        return iteration * tokens_per_iter if tokens_per_iter else None

    def tokens_hint(self) -> str:
        return "a NeMo-RL step does not record its tokens"

    def left_out(self, newest: Path) -> dict[str, str]:
        out = {}
        if _is_dir(self.data_dir(newest) / HF_EXPORT):
            out[HF_EXPORT] = ("Megatron-Bridge's Hugging Face export of the newest input alone (unmerged "
                              "weights)")
        return out

    def copy_beside(self, newest: Path, stage: Path) -> None:
        """The newest step's files around the weights (tokenizer, config, training info, Bridge
        trackers); the weights are the format's, and so is the DTensor optimizer (--optimizer)."""
        root = self.root(newest)
        skip = {Path(POLICY) / OPTIMIZER, Path(self.data_subdir)}
        _copy_tree(root, stage, skip, Path("."))

    def owns_save_dir(self, save_dir: Path) -> bool:
        return bool(self._steps(save_dir))

    def read_tracker(self, save_dir: Path) -> None:
        return None

    def list_checkpoints(self, save_dir: Path, up_to_tracker: bool = True) -> list[tuple[int, Path]]:
        others = [p for p in _step_dirs(save_dir) if backend_of(p) not in (self.backend, None)]
        if others:  # a run saves with one backend: never merge a window of half of it silently
            theirs = next(layout for layout in LAYOUTS if layout.backend == backend_of(others[0]))
            raise PMAError(f"{save_dir}: holds steps of two NeMo-RL backends ({others[0].name}: {theirs.name}, "
                           f"others: {self.name}); merge checkpoints of one run")
        return sorted((int(STEP.match(p.name).group(1)), p) for p in self._steps(save_dir) if self.is_complete(p))

    def _steps(self, save_dir: Path) -> list[Path]:
        return [p for p in _step_dirs(save_dir) if self.owns(p) and backend_of(p) == self.backend]

    def is_complete(self, ckpt: Path) -> bool:
        root = self.root(ckpt)
        if not STEP.match(root.name) or backend_of(root) != self.backend:
            return False
        data = root / self.data_subdir
        if self.backend == "dtensor":
            return safetensors_file.holds_safetensors(data)
        return _is_file(data / dcp.MEGATRON_METADATA_FILE)

    def write_trackers(self, save_dir: Path, iteration: int, output: Path, fsync: bool = True) -> None:
        """No tracker: NeMo-RL resumes from the step_N with the highest N."""

    def trackers(self) -> tuple[str, ...]:
        return ()

    def output_name(self, iteration: int) -> str:
        return f"step_{iteration}"


def _step_dirs(save_dir: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(save_dir) if STEP.match(e.name) and e.is_dir()]
    except OSError:
        return []


def _copy_tree(src: Path, dst: Path, skip: set[Path], rel: Path) -> None:
    """Copy ``src`` into ``dst`` but the relative paths in ``skip`` (folders holding a skipped
    path are walked into, not copied whole)."""
    for entry in os.scandir(src):
        here = rel / entry.name
        if here in skip:
            continue
        if entry.is_dir(follow_symlinks=False):
            if any(here in s.parents for s in skip):
                (dst / entry.name).mkdir(exist_ok=True)
                _copy_tree(Path(entry.path), dst / entry.name, skip, here)
            else:
                shutil.copytree(entry.path, dst / entry.name, symlinks=True, dirs_exist_ok=True)
        elif not (dst / entry.name).exists():
            shutil.copy2(entry.path, dst / entry.name, follow_symlinks=False)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except PermissionError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except PermissionError:
        return False


MEGATRON = NeMoRL("megatron", "Megatron", f"{POLICY}/{WEIGHTS}/{BRIDGE_ITER}", None)  # optimizer: in the DCP
DTENSOR = NeMoRL("dtensor", "DTensor", f"{POLICY}/{WEIGHTS}/{MODEL}", f"{POLICY}/{OPTIMIZER}")
LAYOUTS = (MEGATRON, DTENSOR)
