"""Checkpoint formats: how tensors are stored, and how a merge reads and writes them.

Each format is one module with the same functions (the protocol :mod:`megatron_pma.merge` runs):

    NAME                                   "torch_dist", "torch", ...
    plan(inputs, group, *, method, alpha, weights, normalize, optimizer, num_files,
         verify_integrity, order, save_dtype, output_iteration, allow_extrapolation) -> plan
                                           every check that can fail, before any output exists;
                                           plan.inputs (oldest first; .iteration, .outer, .label,
                                           .layout), .weights, .method, .optimizer, .newest,
                                           .iteration (the output's), .restamped (it differs from
                                           the newest's: the format writes it into the common
                                           state), .warning (a line for the user, or None)
    staging_dirs(plan) -> [Path]           folders to create in the data dir before ranks write
    write(plan, data_dir, group, *, allow_nonfinite, progress, fsync, threads) -> (dict, ...)
                                           this rank's share; the dicts are gathered over ranks
    fields(plan, *gathered) -> dict        what the format adds to pma_provenance.json
    finish(plan, data_dir, *gathered, left_out)
                                           rank 0, last: the format's own files beside the
                                           tensors (metadata, the newest input's other files
                                           but ``left_out``, manifests)
    summary(plan, output, *gathered) -> (bytes written, keys)

Formats are found through :data:`FORMATS`; their modules are imported only when a merge of that
format runs (the legacy one imports torch). Adding a format is one module and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

from megatron_pma.checkpoint import legacy


@dataclass(frozen=True)
class Format:
    name: str
    module: str                       # the protocol's implementation
    detect: Callable[[Path], bool]    # cheap, torch-free: does this checkpoint dir hold this format?

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


# Most specific first; torch_dist takes whatever is left (and names what is wrong with it).
FORMATS: tuple[Format, ...] = (
    Format("torch", "megatron_pma.formats.legacy_torch", legacy.is_legacy_checkpoint),
    Format("safetensors", "megatron_pma.formats.safetensors", lambda path: _safetensors().detect(path)),
    Format("torch_dist", "megatron_pma.formats.torch_dist", lambda path: True),
)


def _safetensors() -> ModuleType:  # torch-free and cheap to import: asked on every merge
    return importlib.import_module("megatron_pma.formats.safetensors")


def of_inputs(inputs: Sequence[str | Path]) -> Format:
    """The format of a merge: the first one any input holds (the format's planner then refuses
    inputs of another format, with a message naming both)."""
    return next(f for f in FORMATS if any(f.detect(Path(p)) for p in inputs))
