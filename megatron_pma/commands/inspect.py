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

    from megatron_pma.checkpoint.common_state import read_common_state
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
        "tokens": _layout_tokens(path, ckpt.iteration),
        "parallel": {k: getattr(args, k, None) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                                         "expert_model_parallel_size", "data_parallel_size")} if args else None,
        "optimizer_state": sorted({k["role"] for k in keys if k["role"] not in ("model", "object")}) or "none",
        "tensor_bytes": total,
        "files": len(files),
        "keys": keys,
    }


def _layout_tokens(path: Path, iteration: int) -> int | None:
    """Tokens as the merge counts them for ``--interval-tokens``: the layout knows where its run
    records them (Megatron-LM: the common state's args; Megatron-Bridge: train_state.pt and
    run_config.yaml); None when nothing does."""
    from megatron_pma.layouts import registry

    try:
        return registry.of_checkpoint(path).tokens(path, iteration, None)
    except PMAError:
        return None


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
        tracker, listing = None, False
    else:
        listing = True
        ckpts = list_checkpoints(path, up_to_tracker=False)
        if not ckpts:
            raise PMAError(f"{path}: neither a checkpoint nor a save dir with complete checkpoints")
        tracker = read_tracker(path)
        infos = [describe_checkpoint(p) for _, p in ckpts]
    if args.json:
        print(json.dumps({"tracker": tracker, "checkpoints": infos} if listing else infos[0], indent=2, default=str))
        return 0
    if listing:
        print(_save_dir_text(path, tracker, infos, show_keys=args.keys))
    else:
        print(_checkpoint_text(infos[0], all_keys=args.keys))
    return 0


# -- text output -------------------------------------------------------------------------------

MAX_KEYS_SHOWN = 40
PARALLEL = (("TP", "tensor_model_parallel_size"), ("PP", "pipeline_model_parallel_size"),
            ("EP", "expert_model_parallel_size"), ("DP", "data_parallel_size"))


def table(headers: list[str], rows: list[list], right: set[int] = frozenset(), indent: str = "  ") -> str:
    """Columns padded to their widest cell; ``right``: indices of right-aligned (numeric) columns."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        cols = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append((indent + "  ".join(cols)).rstrip())
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _tokens(t) -> str:
    return f"{t:,}" if isinstance(t, int) else "unknown"


def _optimizer(info: dict) -> str:
    state = info["optimizer_state"]
    return ", ".join(state) if isinstance(state, list) else str(state)


def _parallel(info: dict) -> str:
    par = info["parallel"] or {}
    shown = [f"{short}={par[k]}" for short, k in PARALLEL if par.get(k) is not None]
    return " ".join(shown) or "unknown"


def _short_format(fmt: str) -> str:
    return "NeMo 2" if fmt.startswith("NeMo 2") else "torch (legacy)" if "legacy" in fmt else fmt.split(" (")[0]


def _model_keys(info: dict) -> list[dict]:
    return [k for k in info["keys"] if k["role"] == "model"]


def _checkpoint_text(info: dict, *, all_keys: bool) -> str:
    model = _model_keys(info)
    lines = [f"{info['path']}: iteration {info['iteration']}, {_tokens(info['tokens'])} tokens",
             table(["format", info["format"]], [
                 ["size", f"{_size(info['tensor_bytes'])} in {info['files']} files"],
                 ["optimizer state", _optimizer(info)],
                 ["parallel", _parallel(info)],
                 ["keys", f"{len(model)} model, {len(info['keys']) - len(model)} other"],
             ]),
             ""]
    shown = info["keys"] if all_keys else model[:MAX_KEYS_SHOWN]
    lines.append(table(["key", "dtype", "shape", "chunks"],
                       [[k["key"], k["dtype"], "x".join(map(str, k["shape"])) if k["shape"] else "-", k["chunks"]]
                        for k in shown], right={3}))
    if not all_keys and len(model) > MAX_KEYS_SHOWN:
        lines.append(f"  ... {len(model) - MAX_KEYS_SHOWN} more model keys (--keys lists every key)")
    return "\n".join(lines)


def _save_dir_text(path: Path, tracker, infos: list[dict], *, show_keys: bool) -> str:
    from megatron_pma.checkpoint import nemo

    if tracker is not None:
        head = f"save dir {path}: tracker -> {tracker}, {len(infos)} complete checkpoints"
    elif nemo.is_save_dir(path):  # -unfinished saves and -EMA copies are not listed
        head = f"NeMo 2 checkpoints dir {path}: {len(infos)} finished checkpoints"
    else:
        head = f"save dir {path}: no tracker, {len(infos)} complete checkpoints"
    rows = [[info["iteration"], _tokens(info["tokens"]), _size(info["tensor_bytes"]), info["files"],
             len(_model_keys(info)), _optimizer(info), _parallel(info), _short_format(info["format"]),
             Path(info["path"]).name] for info in infos]
    lines = [head, table(["iteration", "tokens", "size", "files", "model keys", "optimizer state", "parallel",
                          "format", "checkpoint"], rows, right={0, 1, 2, 3, 4})]
    if show_keys:
        lines += ["", *(_checkpoint_text(info, all_keys=True) + "\n" for info in infos)]
    else:
        lines.append(f"(one checkpoint's keys: megatron-pma inspect {Path(infos[-1]['path'])}; --json for scripts)")
    return "\n".join(lines)
