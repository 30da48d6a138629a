"""`megatron-pma inspect`: what a checkpoint (or every checkpoint of a save dir) holds."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from megatron_pma.errors import PMAError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a checkpoint dir (iter_XXXXXXX, NeMo 2 <name>) or a save dir (NeMo 2: checkpoints/)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--keys", action="store_true", help="list every key (default: a summary)")


def describe_checkpoint(path: Path) -> dict:
    from megatron_pma.checkpoint.dcp_types import TensorStorageMetadata

    from megatron_pma.checkpoint.common_state import consumed_tokens, read_common_state
    from megatron_pma.checkpoint import legacy
    from megatron_pma.merge import load_input, optimizer_role

    if legacy.any_legacy([path]):  # --ckpt-format torch: mp_rank_*/model_optim_rng.pt
        from megatron_pma.formats import legacy_torch as legacy_merge

        return legacy_merge.describe(path)
    from megatron_pma.formats import safetensors as st_format

    if st_format.detect(path):  # Hugging Face folders, NeMo-RL DTensor steps
        return st_format.describe(path)
    ckpt = load_input(path)
    data = ckpt.path  # the torch_dist files (a NeMo 2 checkpoint's weights/)
    state = read_common_state(data, ckpt.metadata)
    keys, total, files = [], 0, set()
    for key, entry in sorted(ckpt.metadata.state_dict_metadata.items()):
        if isinstance(entry, TensorStorageMetadata):
            nbytes = math.prod(entry.size) * entry.properties.dtype.itemsize
            total += nbytes
            keys.append({"key": key, "shape": list(entry.size), "dtype": str(entry.properties.dtype).replace("torch.", ""),
                         "chunks": len(entry.chunks), "role": optimizer_role(key) or "model"})
        else:
            keys.append({"key": key, "shape": None, "dtype": "bytes", "chunks": 1, "role": "object"})
    for info in ckpt.metadata.storage_data.values():
        files.add(info.relative_path)
    args = state.get("args") if state else None
    meta = json.loads((data / "metadata.json").read_text())
    kind = "NeMo 2 (weights/: torch_dist, " if ckpt.root is not None else "torch_dist ("
    return {
        "path": str(path),
        "format": f"{kind}common state: {'common.pt' if (data / 'common.pt').exists() else 'inside DCP'})",
        "metadata_json": meta,
        "iteration": ckpt.iteration,
        "tokens": consumed_tokens(state, ckpt.iteration),
        "parallel": {k: getattr(args, k, None) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                                         "expert_model_parallel_size", "data_parallel_size")} if args else None,
        "optimizer_state": sorted({k["role"] for k in keys if k["role"] not in ("model", "object")}) or "none",
        "tensor_bytes": total,
        "files": len(files),
        "keys": keys,
    }


def run(args: argparse.Namespace) -> int:
    from megatron_pma.checkpoint import nemo
    from megatron_pma.checkpoint.discovery import is_complete, read_tracker
    from megatron_pma.layouts import list_checkpoints

    path = args.path
    if not path.exists():
        raise PMAError(f"{path}: no such file or directory")
    from megatron_pma.formats import safetensors as st_format
    from megatron_pma.layouts import nemo_rl

    if (is_complete(path) or (path / ".metadata").exists() or nemo.root_of(path) is not None
            or st_format.detect(path) or nemo_rl.step_root(path) is not None):
        infos = [describe_checkpoint(path)]
        tracker = None
    else:
        ckpts = list_checkpoints(path, up_to_tracker=False)
        if not ckpts:
            raise PMAError(f"{path}: neither a checkpoint nor a save dir with complete checkpoints")
        tracker = read_tracker(path)
        infos = [describe_checkpoint(p) for _, p in ckpts]
    if args.json:
        print(json.dumps({"tracker": tracker, "checkpoints": infos} if tracker is not None or len(infos) > 1
                         else infos[0], indent=2, default=str))
        return 0
    if tracker is not None:
        print(f"save dir {path}: tracker -> {tracker}, {len(infos)} complete checkpoints")
    elif nemo.is_save_dir(path):  # -unfinished saves and -EMA copies are not listed
        print(f"NeMo 2 checkpoints dir {path}: {len(infos)} finished checkpoints")
    for info in infos:
        model = [k for k in info["keys"] if k["role"] == "model"]
        print(f"{info['path']}: {info['format']}, iteration {info['iteration']}, tokens {info['tokens']}, "
              f"{info['tensor_bytes'] / 2**20:.1f} MiB in {info['files']} files, {len(model)} model keys, "
              f"optimizer state: {info['optimizer_state']}, parallel: {info['parallel']}")
        if args.keys or len(infos) == 1:
            for k in info["keys"] if args.keys else model[:40]:
                print(f"    {k['key']:70s} {k['dtype']:9s} {str(k['shape']):22s} chunks={k['chunks']}")
            if not args.keys and len(model) > 40:
                print(f"    ... {len(model) - 40} more (--keys lists all)")
    return 0
