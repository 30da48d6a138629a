"""Child process of :class:`megatron_pma.training.PMAHook`: select the window, merge, report.

    python -m megatron_pma.training._merge_worker '<json request>'
    python -m megatron_pma.training._merge_worker --serve [--nice N]   # one request per stdin line

Prints one line per request: ``PMA_RESULT {"status": ..., "output": ..., "inputs": [...], "error": ...}``.
Imports neither megatron nor the training code.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from megatron_pma.training.hook import RESULT_PREFIX


def _resolve(spec: str):
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def too_few(req: dict) -> bool:
    """True if the run has fewer than N complete checkpoints up to the request's iteration."""
    from megatron_pma.checkpoint.discovery import list_checkpoints

    have = [it for it, _ in list_checkpoints(req["save_dir"]) if it <= req["iteration"]]
    return len(have) < (req["num_models"] - 1) * (req.get("every") or 1) + 1


def skipped(req: dict) -> dict:
    return {"status": "skipped", "output": None, "inputs": [],
            "error": f"fewer than {req['num_models']} checkpoints up to iteration {req['iteration']}"}


def select_inputs(req: dict) -> list[Path] | None:
    """The window for this request, or None if the run has fewer than N checkpoints so far."""
    from megatron_pma.checkpoint.discovery import select_window

    if too_few(req):
        return None
    return [Path(p) for p in select_window(
        req["save_dir"], req["num_models"], interval_iters=req.get("interval_iters"),
        interval_tokens=req.get("interval_tokens"), tokens_per_iter=req.get("tokens_per_iter"),
        every=req.get("every") or 1, up_to_iteration=req["iteration"],
    )]


def run_request(req: dict, merge_fn=None) -> dict:
    try:
        inputs = select_inputs(req)
        if inputs is None:
            return skipped(req)
        Path(req["output"]).parent.mkdir(parents=True, exist_ok=True)
        fn = merge_fn or _resolve(req.get("merge_fn") or "megatron_pma.merge:merge_checkpoints")
        kw = {k: v for k, v in req["merge_kwargs"].items() if v is not None}
        res = fn([str(p) for p in inputs], req["output"], progress=False, **kw)
        out = getattr(res, "output", None) or req["output"]
        return {"status": "ok", "output": str(out), "inputs": [str(p) for p in inputs], "error": None}
    except BaseException as e:  # reported, never raised
        msg = str(e).strip().splitlines()
        return {"status": "failed", "output": None, "inputs": [],
                "error": f"{type(e).__name__}: {msg[-1] if msg else ''}"}


def _prepare(nice: int) -> None:
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass


def main(argv=None) -> int:
    """``--serve``: answer one JSON request per stdin line until EOF. Otherwise: one request (argv)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        nice = int(argv[argv.index("--nice") + 1]) if "--nice" in argv else 0
        _prepare(nice)
        try:  # import the engine once, up front
            importlib.import_module("megatron_pma.merge")
        except Exception:
            pass
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                res = run_request(json.loads(line))
            except Exception as e:  # a malformed request
                res = {"status": "failed", "output": None, "inputs": [], "error": f"{type(e).__name__}: {e}"}
            sys.stdout.write(RESULT_PREFIX + json.dumps(res) + "\n")
            sys.stdout.flush()
        return 0
    req = json.loads(argv[0])
    _prepare(int(req.get("nice") or 0))
    res = run_request(req)
    print(RESULT_PREFIX + json.dumps(res), flush=True)
    return 0 if res["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
