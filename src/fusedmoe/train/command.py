"""``fusedmoe train``: the command line of :func:`fusedmoe.train.train`.

``fusedmoe --help`` imports this module, so it imports nothing heavy at the top:
the config (which imports jax) and the loop are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from fusedmoe.errors import UsageError

if TYPE_CHECKING:
    from fusedmoe.train.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The preset names are written out rather than read from PRESETS, which
    # would import jax; tests/test_train.py checks that this text names them all.
    parser.add_argument("--preset", default=None,
                        help="model and schedule: tiny, small (default small; tiny: 50 quick "
                        "steps)")
    parser.add_argument("--steps", type=int, default=None,
                        help="total steps of the schedule (default: the preset's)")
    parser.add_argument("--seed", type=int, default=None, help="parameters and data order")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--fused", dest="fused", action="store_true", default=None,
                        help="one grouped matmul for gate+up (default)")
    layout.add_argument("--unfused", dest="fused", action="store_false",
                        help="two grouped matmuls (the baseline)")
    parser.add_argument("--backend", default="auto", help="grouped-matmul backend")
    parser.add_argument("--out", default=None,
                        help="run directory: checkpoints, metrics.jsonl, loss_curve.png")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest finalized checkpoint in --out")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="stop (and checkpoint) after this step, as if interrupted")
    parser.add_argument("--compare", action="store_true",
                        help="instead of a run: time the fused and unfused training step "
                        "side by side for --steps steps and plot both loss curves")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from fusedmoe.train.loop import train
    from fusedmoe.train.metrics import METRICS_FILE
    from fusedmoe.train.resume import holds_a_run

    config = _config_from_args(args)
    if args.compare:
        from fusedmoe.bench.train_bench import compare

        compare(config, out=args.out, verbose=not args.quiet)
        return 0
    if args.out is not None and not args.resume and holds_a_run(args.out):
        raise UsageError(f"--out: {args.out} already holds a run; pass --resume to continue "
                         "it, or choose another directory")
    result = train(config, args.out, resume=args.resume, stop_after=args.stop_after,
                   verbose=not args.quiet)
    if args.out is not None and not args.quiet:
        written = [os.path.join(args.out, METRICS_FILE)]
        if result.plot is not None:
            written.append(result.plot)
        print(f"wrote {', '.join(written)} and checkpoints up to step {result.step}")
    return 0


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the preset's with ``--steps``/``--seed``, or, resuming, the
    checkpoint's (the options may only repeat its values); then the layout and
    backend options. Every bad option is a :class:`UsageError`."""
    from fusedmoe.checkpoint.run_checkpoint import read_run_meta
    from fusedmoe.grouped_matmul.registry import backend_names
    from fusedmoe.train.config import DEFAULT_PRESET, PRESETS, TrainConfig

    if args.backend not in backend_names():
        raise UsageError(f"--backend: got {args.backend!r}, expected one of "
                         f"{', '.join(backend_names())}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps: got {args.steps}, expected an integer >= 1")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed: got {args.seed}, expected an integer >= 0")
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"--preset: got {args.preset!r}, expected one of {', '.join(PRESETS)}")
    saved = None
    if args.resume:
        if args.out is None:
            raise UsageError("--resume: got no --out, expected the run directory to resume")
        try:
            saved = TrainConfig.from_dict(read_run_meta(args.out)["config"])
        except FileNotFoundError:
            saved = None
    if saved is not None:
        # Resuming: the checkpoint says what the run is; options may only agree.
        for opt, value, have in (("--preset", args.preset, saved.preset_name),
                                 ("--steps", args.steps, saved.steps),
                                 ("--seed", args.seed, saved.seed)):
            if value is not None and value != have:
                raise UsageError(f"{opt}: got {value}, expected {have} (the value of the run "
                                 f"being resumed)")
        config = saved
    else:
        config = TrainConfig.preset(args.preset or DEFAULT_PRESET)
        changes = {k: v for k, v in (("steps", args.steps), ("seed", args.seed))
                   if v is not None}
        config = config.replace(**changes)
    fused = True if args.fused is None and saved is None else args.fused
    config = config.with_layout(fused=fused, backend=args.backend)
    if args.stop_after is not None and not 1 <= args.stop_after <= config.steps:
        raise UsageError(f"--stop-after: got {args.stop_after}, expected 1..{config.steps}")
    return config
