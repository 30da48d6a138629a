"""`megatron-pma` command line: inspect | merge | watch | sweep | demo.

Subcommands live in their own modules, each with ``add_arguments(parser)`` and ``run(args)``.
Bad input ends with one line on stderr and exit code 2; nothing is left behind.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from megatron_pma import __version__
from megatron_pma.errors import PMAError

SUBCOMMANDS = {
    "inspect": ("megatron_pma.commands.inspect", "show a checkpoint or save dir: format, iteration, tokens, keys"),
    "merge": ("megatron_pma.commands.merge", "average N checkpoints (SMA/EMA/WMA/LAWA/WSM/custom) into a new one"),
    "watch": ("megatron_pma.training.watch", "sidecar: merge the latest window whenever a checkpoint lands"),
    "sweep": ("megatron_pma.commands.sweep", "merge a grid of windows x N x methods, score each with your evaluator"),
    "demo": ("megatron_pma.demo", "train a tiny GPT on CPU with PMA on and compare merged vs last vs annealed"),
}

READS_CHECKPOINTS = ("inspect", "merge", "watch", "sweep")  # these take --trust-pickles

# Optional dependencies (pyproject's extras): top-level module -> (distribution, extra).
OPTIONAL = {
    "torch": ("torch", "train"),
    "megatron": ("megatron-core", "train"),
    "matplotlib": ("matplotlib", "plot"),
}
# Commands that need optional dependencies whatever their input: checked before they start.
NEEDS = {"demo": (("torch", "megatron", "matplotlib"), "demo")}


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _needs_line(command: str, modules: list[str], extra: str) -> str:
    names = [OPTIONAL[m][0] for m in modules]
    what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"megatron-pma {command} needs {what}: pip install 'megatron-pma[{extra}]'"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-pma", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"megatron-pma {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in READS_CHECKPOINTS:
            p.add_argument("--trust-pickles", action="store_true",
                           help="only for checkpoints you produced: accept pickled classes outside the "
                                "allowlist of what Megatron/torch checkpoints hold (default: refuse them, "
                                "since unpickling one could run code)")
        if only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Import only the chosen subcommand's module: keeps `--help` and `inspect` fast.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    if chosen in NEEDS and not {"-h", "--help"} & set(argv):
        missing = _missing(NEEDS[chosen][0])
        if missing:
            print(_needs_line(chosen, missing, NEEDS[chosen][1]), file=sys.stderr)
            return 2
    args = build_parser(chosen).parse_args(argv)
    if getattr(args, "trust_pickles", False):  # process-wide: forked workers and merge children inherit it
        from megatron_pma.checkpoint import safe_pickle

        safe_pickle.set_trusted(True)
    try:
        module = importlib.import_module(SUBCOMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except ModuleNotFoundError as e:  # e.g. a legacy --ckpt-format torch merge without torch
        top = (e.name or "").split(".")[0]
        if top not in OPTIONAL or not _missing([top]):
            raise
        print(_needs_line(args.command, [top], OPTIONAL[top][1]), file=sys.stderr)
        return 2
    except PMAError as e:
        print(f"megatron-pma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:  # one a check above missed: still one line, naming the path
        print(f"megatron-pma {args.command}: error: {e.filename or e}: permission denied", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `megatron-pma inspect RUN | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except KeyboardInterrupt:
        print(f"megatron-pma {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
