"""A merged ``hf/`` beside a merged Megatron-Bridge checkpoint (``merge_hf_export``, opt-in).

Bridge can write, inside each ``iter_N/``, ``hf/``: its Hugging Face export of that checkpoint
(``checkpoint.also_save_hf_checkpoint``; Bridge 0.6.2 ``training/checkpointing.py``
``_save_hf_weights``: ``export_hf_weights`` streamed into safetensors shards by
``SafeTensorsStateSource.save_generator``, the index, then ``save_artifacts``: config.json,
generation_config.json, tokenizer files; for a PEFT run ``save_hf_adapter``'s adapter files). The
export re-lays each tensor out linearly (QKV and gate/up split or joined, permuted, transposed,
renamed; Bridge 0.6.2's mappings add no constant), so the weighted sum of the inputs' exports is
the export of the weighted sum, up to one rounding in the export's dtype. A merged
``hf/`` is therefore the safetensors format's merge of every input's ``hf/``, with the main merge's
weights and input order; it exists only when every input has one, with the same tensors.

Tensors keep the export's dtypes (``--save-dtype`` applies to the main merge only: the export's
config.json says its dtype). Everything else in ``hf/`` is the newest input's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_pma.checkpoint import safetensors_file
from megatron_pma.errors import PMAError
from megatron_pma.formats import safetensors

FLAG = "--merge-hf-export"


@dataclass
class HFMerge:
    plan: safetensors.Plan
    subdir: str   # where the export sits inside a checkpoint's tensor folder, and the output's ("hf")


def plan(main, group) -> HFMerge:
    """Plan the merge of the inputs' exports beside ``main`` (a format's plan, every check run):
    refused, before anything is written, where an input has none or they differ."""
    layout = main.newest.layout
    sub = layout.hf_export_subdir
    if sub is None:
        raise PMAError(f"{main.newest.label}: {FLAG}: a {layout.name} checkpoint has no Hugging Face "
                       "export (Megatron-Bridge's hf/) to merge")
    folders = [layout.data_dir(layout.root(c.outer)) / sub for c in main.inputs]
    for folder in folders:
        if not safetensors_file.holds_safetensors(folder):
            raise PMAError(f"{folder}: no Hugging Face export here ({FLAG} needs one in every input; "
                           "Bridge writes it with checkpoint.also_save_hf_checkpoint=True)")
    try:  # the main merge's order and weights, as they are (already checked against the user's flags)
        hf = safetensors.plan(folders, group, method="custom", weights=main.weights, order="given",
                              allow_extrapolation=True)
    except PMAError as e:
        raise PMAError(f"{FLAG}: {e}") from None
    return HFMerge(hf, sub)


def staging_dirs(hf: HFMerge) -> list[Path]:
    """Folders to create inside the output's tensor folder before ranks write."""
    return [Path(hf.subdir)] + [Path(hf.subdir) / d for d in safetensors.staging_dirs(hf.plan)]


def write(hf: HFMerge, data: Path, group, **kwargs) -> tuple[dict, ...]:
    """This rank's share of the merged export (the safetensors format's ``write``)."""
    return safetensors.write(hf.plan, Path(data) / hf.subdir, group, **kwargs)


def finish(hf: HFMerge, data: Path, *gathered: dict) -> None:
    """Rank 0, after every rank wrote: the newest input's index, config and tokenizer files."""
    safetensors.finish(hf.plan, Path(data) / hf.subdir, *gathered, left_out={})


def describe(hf: HFMerge) -> str:
    """What ``pma_provenance.json`` says about the output's ``hf/``."""
    p = hf.plan
    return (f"merged ({hf.subdir}/ of every input, averaged with the weights above: {p.merged} of "
            f"{p.tensors} tensors in {len(p.newest.checkpoint.files)} files; the other tensors, the index, "
            "config and tokenizer files the newest input's)")


def bytes_written(hf: HFMerge, output: Path, *gathered: dict) -> int:
    return safetensors.summary(hf.plan, output, *gathered)[0]
