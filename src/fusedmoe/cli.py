"""The ``fusedmoe`` command line: one subcommand per module.

Each subcommand lives in its own module that defines
``add_arguments(parser)`` and ``run(args) -> int``; the table below maps
names to modules. Subcommand modules import jax and friends inside ``run``
where they can, so ``--help`` stays quick. Bad options end with a
one-line error naming the option and the valid values, exit code 2, no
traceback (:class:`UsageError`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fusedmoe.errors import UsageError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("fusedmoe.bench.moe_bench", "time the MoE layer fused vs unfused on every backend"),
    "bench-gmm": ("fusedmoe.bench.gmm_bench", "time each grouped-matmul backend vs dense GEMM"),
    "bench-generate": ("fusedmoe.bench.generate_bench",
                       "time a whole model's prefill and decode vs transformers' generate"),
    "check": ("fusedmoe.check", "equivalence checks: fused vs unfused, each backend vs reference"),
    "convert": ("fusedmoe.checkpoint.convert_cli", "convert Hugging Face <-> orbax checkpoints"),
    "train": ("fusedmoe.train.command", "train the small MoE language model"),
    "generate": ("fusedmoe.generate_cli",
                 "generate text from a Hugging Face model or a training run's checkpoint"),
    "cache": ("fusedmoe.cache_cli", "list, or clean, the compiled cpu_kernel builds on disk"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Every parser needs its arguments for --help, so each module is imported.
        module = importlib.import_module(module_name)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except UsageError as exc:
        print(f"fusedmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The console script and ``python -m fusedmoe``."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
