"""`megatron-pma` command line: inspect | merge | watch | sweep | demo.

Subcommands live in their own modules, each with ``add_arguments(parser)`` and ``run(args)``.
Bad input ends with one line on stderr and exit code 2; nothing is left behind.
"""

from __future__ import annotations

import argparse
import importlib
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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-pma", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"megatron-pma {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Import only the chosen subcommand's module: keeps `--help` and `inspect` fast.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    args = build_parser(chosen).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except PMAError as e:
        print(f"megatron-pma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:  # one a check above missed: still one line, naming the path
        print(f"megatron-pma {args.command}: error: {e.filename or e}: permission denied", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megatron-pma {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
