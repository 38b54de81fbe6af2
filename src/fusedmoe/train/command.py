"""``fusedmoe train``: the command line of :func:`fusedmoe.train.train`.

A run trains the toy model of a preset from random parameters, or, with
``--init DIR``, a Hugging Face model from its weights (the preset then gives
the schedule only); ``--export-hf OUT`` writes the tuned model back in the
Hugging Face format. The tokens are the shipped text as bytes, the shipped
text through ``DIR/tokenizer.json``, or ``--data FILE`` (token ids, ``.txt``
or ``.npy``; :mod:`fusedmoe.train.data`).

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
    parser.add_argument("--init", default=None, metavar="DIR",
                        help="fine-tune the Hugging Face model in DIR (a family "
                        "fusedmoe.hf.load_model loads): start from its weights, in float32, on "
                        "the shipped text through DIR/tokenizer.json (or on --data); the preset "
                        "gives the schedule only")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="train on the token ids in FILE instead of the shipped text: .npy "
                        "(an integer array, read in order) or .txt (integers separated by "
                        "spaces, commas or newlines); every id below the model's vocabulary")
    parser.add_argument("--export-hf", default=None, metavar="DIR",
                        help="after the run, write the tuned model to the new directory DIR in "
                        "the Hugging Face format (needs --init; with the source's tokenizer "
                        "files)")
    parser.add_argument("--learning-rate", type=float, default=None, metavar="LR",
                        help="peak learning rate (default: the preset's; fine-tuning a real "
                        "model wants far less, e.g. 1e-5)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per step (default: the preset's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence "
                        "(default: the preset's)")
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
    from fusedmoe.errors import CheckpointError
    from fusedmoe.train.loop import train
    from fusedmoe.train.metrics import METRICS_FILE
    from fusedmoe.train.pretrained import export_hf
    from fusedmoe.train.resume import holds_a_run

    if args.compare and (args.init or args.data or args.export_hf):
        raise UsageError("--compare: times the preset's toy model on the shipped text; it "
                         "takes no --init, --data or --export-hf")
    config = _config_from_args(args)
    if args.compare:
        from fusedmoe.bench.train_bench import compare

        compare(config, out=args.out, verbose=not args.quiet)
        return 0
    export = _export_path(args, config)
    if args.out is not None and not args.resume and holds_a_run(args.out):
        raise UsageError(f"--out: {args.out} already holds a run; pass --resume to continue "
                         "it, or choose another directory")
    try:
        result = train(config, args.out, resume=args.resume, stop_after=args.stop_after,
                       verbose=not args.quiet)
    except CheckpointError as exc:  # only --init's weights are read as a Hugging Face model
        raise UsageError(f"--init: {exc}") from None
    written = []
    if args.out is not None:
        written.append(os.path.join(args.out, METRICS_FILE))
        if result.plot is not None:
            written.append(result.plot)
    if export is not None:
        export_hf(result.state["params"], result.config.model, export,
                  tokenizer_from=config.init or None)
        written.append(f"{export} (Hugging Face model)")
    if written and not args.quiet:
        tail = f" and checkpoints up to step {result.step}" if args.out is not None else ""
        print(f"wrote {', '.join(written)}{tail}")
    return 0


def _export_path(args: argparse.Namespace, config: TrainConfig) -> str | None:
    """``--export-hf``'s directory, checked: new, creatable, and a model that the
    Hugging Face format can hold."""
    from fusedmoe.atomic import file_in_the_way
    from fusedmoe.errors import CheckpointError
    from fusedmoe.train.pretrained import check_exportable

    if args.export_hf is None:
        return None
    path = os.path.abspath(args.export_hf)
    if not config.model.model_type:
        raise UsageError("--export-hf: the run's model is fusedmoe's own toy model; only a run "
                         "started with --init (a Hugging Face model) can be exported")
    try:
        check_exportable(config.model)
    except CheckpointError as exc:
        raise UsageError(f"--export-hf: {exc}") from None
    if os.path.exists(path):
        kind = "a file" if not os.path.isdir(path) else "a directory that already exists"
        raise UsageError(f"--export-hf: {args.export_hf} is {kind}; expected a new directory")
    blocked = file_in_the_way(path)
    if blocked is not None:
        raise UsageError(f"--export-hf: {blocked} is a file, not a directory")
    if args.out is not None and path == os.path.abspath(args.out):
        raise UsageError("--export-hf: must differ from --out (the run directory)")
    return path


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the preset's with the options given (and, with ``--init``,
    the model of that directory), or, resuming, the checkpoint's (the options may
    only repeat its values); then the layout and backend options; then the token
    stream, read and checked. Every bad option is a :class:`UsageError`."""
    from fusedmoe.checkpoint.run_checkpoint import read_run_meta
    from fusedmoe.grouped_matmul.registry import backend_names
    from fusedmoe.train.config import TrainConfig

    if args.backend not in backend_names():
        raise UsageError(f"--backend: got {args.backend!r}, expected one of "
                         f"{', '.join(backend_names())}")
    _check_numbers(args)
    saved = None
    if args.resume:
        if args.out is None:
            raise UsageError("--resume: got no --out, expected the run directory to resume")
        try:
            saved = TrainConfig.from_dict(read_run_meta(args.out)["config"])
        except FileNotFoundError:
            saved = None
    given = _given(args)
    if saved is not None:
        # Resuming: the checkpoint says what the run is; options may only agree.
        for opt, (field, value) in given.items():
            have = getattr(saved, field)
            if value != have:
                raise UsageError(f"{opt}: got {value}, expected {have or 'none'} (the value of "
                                 "the run being resumed)")
        config = saved
    else:
        config = _new_config(args, given)
    fused = True if args.fused is None and saved is None else args.fused
    config = config.with_layout(fused=fused, backend=args.backend)
    if args.stop_after is not None and not 1 <= args.stop_after <= config.steps:
        raise UsageError(f"--stop-after: got {args.stop_after}, expected 1..{config.steps}")
    return _with_data(config, args, resuming=saved is not None)


def _check_numbers(args: argparse.Namespace) -> None:
    from fusedmoe.train.config import PRESETS

    for opt, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                       ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise UsageError(f"{opt}: got {value}, expected an integer >= 1")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed: got {args.seed}, expected an integer >= 0")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise UsageError(f"--learning-rate: got {args.learning_rate}, expected a number > 0")
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"--preset: got {args.preset!r}, expected one of {', '.join(PRESETS)}")


def _given(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """option -> (TrainConfig field, value) for the options given (paths absolute)."""
    values = {
        "--preset": ("preset_name", args.preset), "--steps": ("steps", args.steps),
        "--seed": ("seed", args.seed), "--learning-rate": ("learning_rate", args.learning_rate),
        "--batch-size": ("batch_size", args.batch_size), "--seq-len": ("seq_len", args.seq_len),
        "--init": ("init", args.init and os.path.abspath(args.init)),
        "--data": ("data", args.data and os.path.abspath(args.data)),
    }
    return {opt: fv for opt, fv in values.items() if fv[1] is not None}


def _new_config(args: argparse.Namespace, given: dict[str, tuple[str, object]]) -> TrainConfig:
    """A fresh run's config: the preset with the options given; with ``--init``, the
    model of that directory and its tokenizer (unless ``--data``)."""
    from fusedmoe.errors import CheckpointError
    from fusedmoe.train.config import DEFAULT_PRESET, TrainConfig
    from fusedmoe.train.pretrained import TOKENIZER_FILE, init_model_config

    config = TrainConfig.preset(args.preset or DEFAULT_PRESET)
    changes = {field: value for opt, (field, value) in given.items() if opt != "--preset"}
    if args.init is not None:
        init = changes["init"]
        try:
            changes["model"] = init_model_config(init, fused=args.fused is not False,
                                                 backend=args.backend)
        except CheckpointError as exc:
            raise UsageError(f"--init: {exc}") from None
        tokenizer = os.path.join(init, TOKENIZER_FILE)
        if args.data is None:
            if not os.path.isfile(tokenizer):
                raise UsageError(f"--init: {args.init} has no {TOKENIZER_FILE}; pass --data "
                                 "FILE with the token ids to train on")
            changes["tokenizer"] = tokenizer
    seq_len = changes.get("seq_len", config.seq_len)
    max_len = changes.get("model", config.model).max_seq_len
    if seq_len > max_len:
        opt = "--seq-len" if args.seq_len is not None else "--preset"
        raise UsageError(f"{opt}: sequences of {seq_len} tokens exceed the model's "
                         f"max_seq_len {max_len}; pass a --seq-len of at most {max_len}")
    try:
        return config.replace(**changes)
    except (TypeError, ValueError) as exc:  # e.g. a model the trainer cannot train
        raise UsageError(f"{'--init' if args.init else 'config'}: {exc}") from None


def _with_data(config: TrainConfig, args: argparse.Namespace, *, resuming: bool) -> TrainConfig:
    """``config`` with its token stream's digest, after reading the stream and
    checking it against the model (:func:`fusedmoe.train.data.stream_for`)."""
    from fusedmoe.train.data import stream_for

    try:
        config, _ = stream_for(config)
    except ValueError as exc:
        opt = "--data" if config.data else "--init" if config.tokenizer else "data"
        if resuming and args.data is None and args.init is None:
            opt = "--resume"
        raise UsageError(f"{opt}: {exc}") from None
    return config
