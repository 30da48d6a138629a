"""The merge child: one process protocol for :class:`~megatron_pma.training.PMAHook` and the
watcher (``megatron-pma watch``), so a merge never runs inside the training process or the
watcher's polling loop.

    python -m megatron_pma.training.merge_child '<json request>'           one request; exit 0 ok/skipped, 1 failed
    python -m megatron_pma.training.merge_child --serve [--nice N]         one request per stdin line, until EOF

A request (JSON) names ``output`` and ``merge_kwargs`` (method, alpha, weights, optimizer, threads,
...), optionally ``nice`` and ``merge_fn`` (``"module:function"``, default the engine's
``merge_checkpoints``), and its inputs: either ``inputs`` (checkpoint paths) or a window to select:
``save_dir``, ``iteration`` (the window ends at or before it), ``num_models``, ``interval_iters``,
``interval_tokens``, ``tokens_per_iter``, ``every``.

The answer is one stdout line, ``PMA_RESULT {json}``: ``status`` (ok | skipped | failed),
``output``, ``inputs``, ``iterations``, ``weights``, ``seconds`` and ``error`` (None or one line).
Imports neither megatron nor the training code.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

RESULT_PREFIX = "PMA_RESULT "
DEFAULT_MERGE_FN = "megatron_pma.merge:merge_checkpoints"
# Environment of a distributed launcher: the child must not think it is one rank of many.
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS")


def command(python: str, *args: str) -> list[str]:
    return [python, "-m", "megatron_pma.training.merge_child", *args]


def child_env() -> dict:
    """The child's environment: ours without the launcher's rank variables, one OpenMP thread."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def parse_result(line: str) -> dict | None:
    """The answer carried by one line of the child's stdout, else None."""
    line = line.strip()
    return json.loads(line[len(RESULT_PREFIX):]) if line.startswith(RESULT_PREFIX) else None


def _resolve(spec: str):
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def too_few(req: dict) -> bool:
    """True if the run has fewer than N complete checkpoints up to the request's iteration."""
    from megatron_pma.layouts import list_checkpoints

    have = [it for it, _ in list_checkpoints(req["save_dir"]) if it <= req["iteration"]]
    return len(have) < (req["num_models"] - 1) * (req.get("every") or 1) + 1


def skipped(req: dict) -> dict:
    return {"status": "skipped", "output": None, "inputs": [],
            "error": f"fewer than {req['num_models']} checkpoints up to iteration {req['iteration']}"}


def select_inputs(req: dict) -> list[Path] | None:
    """The request's inputs: given, or the window it names (None: fewer than N checkpoints so far)."""
    from megatron_pma.layouts import select_window

    if req.get("inputs") is not None:
        return [Path(p) for p in req["inputs"]]
    if too_few(req):
        return None
    return [Path(p) for p in select_window(
        req["save_dir"], req["num_models"], interval_iters=req.get("interval_iters"),
        interval_tokens=req.get("interval_tokens"), tokens_per_iter=req.get("tokens_per_iter"),
        every=req.get("every") or 1, up_to_iteration=req["iteration"],
    )]


def one_line(e: BaseException) -> str:
    """An error as one line: our own errors as they read, others with their type."""
    from megatron_pma.errors import PMAError

    msg = str(e).strip().splitlines()
    if isinstance(e, PMAError) and msg:
        return msg[0]
    return f"{type(e).__name__}: {msg[-1] if msg else ''}"


def run_request(req: dict, merge_fn=None) -> dict:
    t0 = time.monotonic()
    try:
        inputs = select_inputs(req)
        if inputs is None:
            return skipped(req)
        Path(req["output"]).parent.mkdir(parents=True, exist_ok=True)
        fn = merge_fn or _resolve(req.get("merge_fn") or DEFAULT_MERGE_FN)
        kw = {k: v for k, v in req["merge_kwargs"].items() if v is not None}
        res = fn([str(p) for p in inputs], req["output"], progress=False, **kw)
        return {"status": "ok", "output": str(getattr(res, "output", None) or req["output"]),
                "inputs": [str(p) for p in inputs], "error": None,
                "iterations": list(getattr(res, "iterations", [])),
                "weights": [float(w) for w in getattr(res, "weights", [])],
                "seconds": float(getattr(res, "seconds", time.monotonic() - t0))}
    except BaseException as e:  # reported, never raised
        return {"status": "failed", "output": None, "inputs": [], "error": one_line(e)}


def _prepare(nice: int) -> None:
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass


def _answer(res: dict) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(res) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    """``--serve``: answer one JSON request per stdin line until EOF. Otherwise: one request (argv)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        _prepare(int(argv[argv.index("--nice") + 1]) if "--nice" in argv else 0)
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
            _answer(res)
        return 0
    req = json.loads(argv[0])
    _prepare(int(req.get("nice") or 0))
    res = run_request(req)
    _answer(res)
    return 0 if res["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
