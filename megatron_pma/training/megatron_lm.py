"""Run a Megatron-LM training script with PMA merging after every checkpoint save, unpatched.

Usage (one process, or under ``torchrun``/``srun`` exactly like the script itself)::

    python -m megatron_pma.training.megatron_lm pretrain_gpt.py <Megatron-LM args> \\
        --pma-num-models 4 --pma-method ema --pma-alpha 0.2 \\
        [--pma-interval-iters K] [--pma-output-root DIR] [--pma-optimizer drop|average]
        [--pma-save-dtype input|fp32|bf16|fp16]

    torchrun --nproc_per_node 8 -m megatron_pma.training.megatron_lm pretrain_gpt.py ...

Every ``--pma-*`` argument is taken out of the command line; the training script runs as
``__main__`` (like ``python pretrain_gpt.py``) with the rest. Before it starts, a hook is
installed into ``megatron.training.checkpointing`` (Megatron-LM / megatron-core >= 0.19) so that
``PMAHook.on_checkpoint_saved(iteration)`` is called on global rank 0 once a save is *final*:

* synchronous save: when ``save_checkpoint`` returns (the tracker file
  ``latest_checkpointed_iteration.txt`` has been written by rank 0 and every rank passed the
  closing barrier);
* asynchronous save (``--async-save``): right after ``save_checkpoint``'s own
  ``iter_finalize_fn`` (the finalize function that writes the tracker) has run, inside
  ``maybe_finalize_async_save``. Our callback is inserted into the same request, directly
  after that function, so it runs only if the tracker write succeeded.

In both cases the callback re-reads the tracker and fires only when it names that iteration,
so non-persistent (local or global) saves, ``release`` saves and saves to another directory
never trigger a merge. The merge runs in the hook's background worker; training never waits
for it, except once at the very end (the launcher waits for the merge in flight before exit).

A script that trains through Megatron-Bridge (it imports ``megatron.bridge``) saves through Bridge's
own ``save_checkpoint``: the launcher stops with one line pointing to
``megatron_pma.training.bridge.PMACallback``, the Bridge callback.

If the installed Megatron does not have the structure this relies on, the launcher stops
before training with one line naming the Megatron version (use the patch in
``patches/megatron-lm/`` or the ``megatron-pma watch`` sidecar instead).
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import os
import runpy
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_pma import schedules
from megatron_pma.names import OPTIMIZER_MODES, SAVE_DTYPES, TRACKER as TRACKER_NAME

_FINALIZE_FN_NAME = "iter_finalize_fn"
_MARK = "__megatron_pma_wrapped__"

OnSaved = Callable[[int, str], None]  # (iteration, save_dir)


class InterceptionError(RuntimeError):
    """The installed Megatron-LM does not have the save structure the hook relies on."""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _pma_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_pma.training.megatron_lm SCRIPT [megatron args]",
        description="PMA options (all start with --pma-); everything else goes to SCRIPT.",
        allow_abbrev=False,
        add_help=False,
    )
    p.add_argument("--pma-num-models", type=int, required=True,
                   help="number of checkpoints in each merge window (>= 1)")
    p.add_argument("--pma-method", default="sma", choices=schedules.METHODS)
    p.add_argument("--pma-alpha", type=float, default=0.2, help="EMA alpha")
    p.add_argument("--pma-weights", default=None, help="custom weights w1,w2,... (oldest first)")
    p.add_argument("--pma-interval-iters", type=int, default=None,
                   help="spacing of the window's checkpoints in iterations (default: consecutive saves)")
    p.add_argument("--pma-interval-tokens", type=int, default=None,
                   help="spacing of the window's checkpoints in tokens")
    p.add_argument("--pma-optimizer", default="drop", choices=OPTIMIZER_MODES)
    p.add_argument("--pma-save-dtype", default="input", choices=list(SAVE_DTYPES),
                   help="dtype of the merged model weights (default input: as saved)")
    p.add_argument("--pma-output-root", default=None,
                   help="where merged checkpoints go (default <save>/pma); one iter_XXXXXXX per merge")
    p.add_argument("--pma-help", action="help", help="show this help and exit")
    return p


def split_pma_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into (``--pma-*`` tokens, everything else), order kept.

    ``--pma-x=v`` and ``--pma-x v`` are both accepted. A value token is taken with its option
    unless it starts with ``--`` (so ``--pma-alpha -0.5`` still works).
    """
    ours: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--pma-"):
            ours.append(tok)
            if "=" not in tok and tok != "--pma-help" and i + 1 < len(argv) \
                    and not argv[i + 1].startswith("--"):
                ours.append(argv[i + 1])
                i += 1
        else:
            rest.append(tok)
        i += 1
    return ours, rest


def parse_pma_args(tokens: list[str]) -> argparse.Namespace:
    ns = _pma_parser().parse_args(tokens)
    if ns.pma_num_models < 1:
        raise SystemExit("megatron-pma: --pma-num-models must be >= 1")
    if ns.pma_method == "custom" and not ns.pma_weights:
        raise SystemExit("megatron-pma: --pma-method custom needs --pma-weights")
    if ns.pma_weights is not None:
        try:
            ns.pma_weights = [float(w) for w in ns.pma_weights.split(",") if w.strip()]
        except ValueError:
            raise SystemExit("megatron-pma: --pma-weights must be numbers separated by commas")
        if len(ns.pma_weights) != ns.pma_num_models:
            raise SystemExit(
                f"megatron-pma: --pma-weights has {len(ns.pma_weights)} values for "
                f"--pma-num-models {ns.pma_num_models}")
    return ns


# --------------------------------------------------------------------------------------------
# The interception
# --------------------------------------------------------------------------------------------


def _megatron_version() -> str:
    """The version of the megatron-core that ``import megatron`` finds (read from its
    package_info.py without importing it), else the installed distribution's."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("megatron")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            info = Path(loc) / "core" / "package_info.py"
            if info.is_file():
                text = info.read_text()
                parts = [re.search(rf"^{k}\s*=\s*['\"]?([^'\"\n]*)['\"]?\s*$", text, re.M)
                         for k in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE")]
                if all(parts[:3]):
                    v = ".".join(p.group(1) for p in parts[:3])
                    return f"megatron-core {v}{parts[3].group(1) if parts[3] else ''}"
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return f"megatron-core {version('megatron-core')}"
    except Exception:
        return "megatron (version unknown)"


def _nested_code(code: types.CodeType, name: str) -> list[types.CodeType]:
    """All code objects called ``name`` nested (at any depth) in ``code``."""
    found = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_name == name:
                found.append(const)
            found.extend(_nested_code(const, name))
    return found


def check_structure(ckpt_mod: types.ModuleType) -> None:
    """Raise InterceptionError unless ``ckpt_mod`` looks like Megatron-LM's checkpointing.py
    as of megatron-core 0.19: ``save_checkpoint(iteration, ...)`` which, on rank 0, defines
    ``iter_finalize_fn`` (writes the tracker, closes over ``tracker_filename``) and hands async
    requests to the module-level ``schedule_async_save``."""
    where = getattr(ckpt_mod, "__file__", ckpt_mod.__name__)
    problems = []
    save = getattr(ckpt_mod, "save_checkpoint", None)
    if not callable(save):
        problems.append("no save_checkpoint()")
    if not callable(getattr(ckpt_mod, "schedule_async_save", None)):
        problems.append("no schedule_async_save()")
    if not callable(getattr(ckpt_mod, "get_checkpoint_tracker_filename", None)):
        problems.append("no get_checkpoint_tracker_filename()")
    if callable(save):
        save = inspect.unwrap(save)
        code = getattr(save, "__code__", None)
        try:
            params = list(inspect.signature(save).parameters)
        except (TypeError, ValueError):
            params = []
        if not params or params[0] != "iteration":
            problems.append("save_checkpoint's first parameter is not 'iteration'")
        if code is None:
            problems.append("save_checkpoint is not a Python function")
        else:
            if "schedule_async_save" not in code.co_names:
                problems.append("save_checkpoint does not call schedule_async_save")
            fins = _nested_code(code, _FINALIZE_FN_NAME)
            if not fins:
                problems.append(f"save_checkpoint defines no {_FINALIZE_FN_NAME}")
            elif not any("tracker_filename" in f.co_freevars for f in fins):
                problems.append(f"{_FINALIZE_FN_NAME} does not use tracker_filename")
    if problems:
        raise InterceptionError(
            f"megatron-pma: cannot hook checkpoint saves in {_megatron_version()} ({where}): "
            + "; ".join(problems)
            + " -- use patches/megatron-lm/0001-pma-hook.patch or `megatron-pma watch` instead"
        )


def _is_rank0() -> bool:
    try:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except Exception:
        return True


def read_tracker(save_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(save_dir, TRACKER_NAME)) as f:
            return f.read().strip()
    except OSError:
        return None


def _log(msg: str) -> None:
    print(f"[megatron-pma] {msg}", file=sys.stderr, flush=True)


@dataclass
class _SaveCall:
    iteration: int
    persistent: bool = True  # False for non-persistent (local/global) and release saves
    attached: bool = False


@dataclass
class Installation:
    """What ``install`` changed; ``uninstall()`` puts it back."""

    module: types.ModuleType
    on_saved: OnSaved
    original_save: Callable
    original_schedule: Callable
    rebound: list = field(default_factory=list)  # (module, attribute name, original object)
    fired: list = field(default_factory=list)  # iterations reported, in order

    def uninstall(self) -> None:
        for mod, name, orig in reversed(self.rebound):
            setattr(mod, name, orig)
        self.rebound.clear()


_local = threading.local()


def _fire(inst: Installation, iteration: int, save_dir: str, how: str) -> None:
    """Report a final save if the tracker in ``save_dir`` names ``iteration``."""
    if not _is_rank0():
        return
    tracker = read_tracker(save_dir)
    if tracker != str(iteration):
        # Non-persistent / local / release saves do not update <save>'s tracker this way.
        return
    inst.fired.append(iteration)
    try:
        inst.on_saved(iteration, save_dir)
    except Exception as exc:  # never break training because of PMA
        _log(f"PMA hook failed for iteration {iteration} ({how} save): {type(exc).__name__}: {exc}")


def _closure_value(fn: Callable, name: str):
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__ or name not in code.co_freevars:
        return None
    try:
        return fn.__closure__[code.co_freevars.index(name)].cell_contents
    except ValueError:  # empty cell
        return None


def install(on_saved: OnSaved, module: types.ModuleType | None = None) -> Installation:
    """Wrap ``save_checkpoint`` and ``schedule_async_save`` of Megatron-LM's checkpointing
    module so that ``on_saved(iteration, save_dir)`` is called on rank 0 after each final save.

    ``module`` defaults to ``megatron.training.checkpointing`` (imported here). Names bound by
    ``from megatron.training.checkpointing import save_checkpoint`` in already-imported
    modules (``megatron.training.training``) are rebound too.
    """
    if module is None:
        try:
            import megatron.training.checkpointing as module  # noqa: PLW0621
        except ImportError as exc:
            raise InterceptionError(
                f"megatron-pma: cannot import megatron.training.checkpointing with "
                f"{_megatron_version()} ({type(exc).__name__}: {exc}); Megatron-LM's "
                f"megatron/training must be importable (megatron-core >= 0.19 ships it)"
            ) from exc
    if getattr(module.save_checkpoint, _MARK, False) if hasattr(module, "save_checkpoint") else False:
        raise InterceptionError("megatron-pma: the PMA save hook is already installed")
    check_structure(module)

    original_save = module.save_checkpoint
    original_schedule = module.schedule_async_save
    sig = inspect.signature(original_save)
    inst = Installation(module, on_saved, original_save, original_schedule)

    def _tracker_dir_default() -> Optional[str]:
        get_args = getattr(module, "get_args", None)
        try:
            return get_args().save if get_args else None
        except Exception:
            return None

    @functools.wraps(original_schedule)
    def schedule_async_save(async_request, *args, **kwargs):
        call: Optional[_SaveCall] = getattr(_local, "call", None)
        fns = getattr(async_request, "finalize_fns", None)
        if call is not None and call.persistent and fns is not None:
            for idx, fn in enumerate(list(fns)):
                if getattr(fn, "__name__", "") == _FINALIZE_FN_NAME and \
                        getattr(fn, "__module__", None) == module.__name__:
                    tracker_filename = _closure_value(fn, "tracker_filename")
                    save_dir = (os.path.dirname(tracker_filename) if tracker_filename
                                else _tracker_dir_default())
                    iteration = call.iteration

                    def pma_after_tracker_written(_it=iteration, _dir=save_dir):
                        if _dir is not None:
                            _fire(inst, _it, _dir, "async")

                    if isinstance(fns, list):
                        fns.insert(idx + 1, pma_after_tracker_written)  # right after it
                        call.attached = True
                    elif callable(getattr(async_request, "add_finalize_fn", None)):
                        async_request.add_finalize_fn(pma_after_tracker_written)  # later = after
                        call.attached = True
                    break
        return original_schedule(async_request, *args, **kwargs)

    @functools.wraps(original_save)
    def save_checkpoint(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
            iteration = int(bound.arguments["iteration"])
        except Exception:
            return original_save(*args, **kwargs)
        persistent = not (bound.arguments.get("non_persistent_ckpt", False)
                          or bound.arguments.get("release", False))
        call = _SaveCall(iteration, persistent)
        outer = getattr(_local, "call", None)
        _local.call = call
        try:
            result = original_save(*args, **kwargs)
        finally:
            _local.call = outer
        if not call.attached:
            # Synchronous save: rank 0 wrote the tracker and all ranks passed the barrier.
            # (Async save on rank != 0 also lands here; _fire's tracker check and rank check
            # make that a no-op.)
            get_args = getattr(module, "get_args", None)
            try:
                is_async = bool(get_args().async_save) if get_args else False
            except Exception:
                is_async = False
            save_dir = _tracker_dir_default()
            if save_dir is not None and persistent:
                if not is_async:
                    _fire(inst, iteration, save_dir, "sync")
                elif _is_rank0():
                    _log(f"could not attach to the async finalize of iteration {iteration}; "
                         f"no PMA merge for it")
        return result

    setattr(save_checkpoint, _MARK, True)
    setattr(schedule_async_save, _MARK, True)

    inst.rebound.append((module, "schedule_async_save", original_schedule))
    module.schedule_async_save = schedule_async_save
    inst.rebound.append((module, "save_checkpoint", original_save))
    module.save_checkpoint = save_checkpoint
    # Rebind `from ...checkpointing import save_checkpoint` copies (megatron.training.training).
    for name, mod in list(sys.modules.items()):
        if mod is None or mod is module or not name.startswith("megatron"):
            continue
        if getattr(mod, "save_checkpoint", None) is original_save:
            inst.rebound.append((mod, "save_checkpoint", original_save))
            mod.save_checkpoint = save_checkpoint
    return inst


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def trains_through_bridge(script: str) -> bool:
    """Whether ``script`` imports Megatron-Bridge (``megatron.bridge``): its train loop saves through
    Bridge's own ``save_checkpoint``, which the Megatron-LM interception never sees."""
    try:
        with open(script, "rb") as f:
            tree = ast.parse(f.read(), filename=script)
    except (OSError, SyntaxError, ValueError):
        return False  # the script's own run reports it
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        if any(n == "megatron.bridge" or n.startswith("megatron.bridge.") for n in names):
            return True
    return False



class _LazyHook:
    """Creates the PMAHook on the first final save (rank 0 only), with the tracker's dir."""

    def __init__(self, opts: argparse.Namespace, factory=None):
        self.opts = opts
        self.factory = factory
        self.hook = None

    def __call__(self, iteration: int, save_dir: str) -> None:
        if self.hook is None:
            factory = self.factory
            if factory is None:
                from megatron_pma.training import PMAHook as factory
            o = self.opts
            self.hook = factory(
                save_dir,
                o.pma_num_models,
                method=o.pma_method,
                alpha=o.pma_alpha,
                weights=o.pma_weights,
                interval_iters=o.pma_interval_iters,
                interval_tokens=o.pma_interval_tokens,
                optimizer=o.pma_optimizer,
                save_dtype=o.pma_save_dtype,
                output_root=o.pma_output_root,
            )
        self.hook.on_checkpoint_saved(iteration)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()


def main(argv: list[str] | None = None, hook_factory=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = split_pma_args(argv)
    if not rest or rest[0] in ("-h", "--help"):
        _pma_parser().print_help()
        return 0 if rest else 2
    script = rest[0]
    if not ours:
        print("megatron-pma: no --pma-* arguments given (at least --pma-num-models N)",
              file=sys.stderr)
        return 2
    try:
        opts = parse_pma_args(ours)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return 2 if exc.code else 0
    if not os.path.isfile(script):
        print(f"megatron-pma: training script not found: {script}", file=sys.stderr)
        return 2

    if trains_through_bridge(script):
        print(f"megatron-pma: {script} trains through Megatron-Bridge, whose saves this launcher cannot see: "
              "pass callbacks=[megatron_pma.training.bridge.PMACallback(num_models=N)] to pretrain() instead",
              file=sys.stderr)
        return 2

    # Like `python SCRIPT`: its directory first on sys.path (Megatron-LM's pretrain_*.py import
    # from the repo root they live in).
    script_dir = os.path.dirname(os.path.abspath(script))
    sys.path.insert(0, script_dir)
    lazy = _LazyHook(opts, hook_factory)
    try:
        inst = install(lazy)
    except InterceptionError as exc:
        print(str(exc), file=sys.stderr)
        return 2

    sys.argv = [script] + rest[1:]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        try:
            lazy.close()  # wait for the merge in flight (rank 0)
        finally:
            inst.uninstall()
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
