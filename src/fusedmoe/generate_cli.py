"""``fusedmoe generate``: text from a ``fusedmoe train`` run, or from a Hugging
Face model directory.

- ``fusedmoe generate RUN_DIR --prompt "..."``: the byte-level model of a
  training run. Each new byte runs the model over a fixed window of the last
  ``max_seq_len`` bytes (one compiled function for the whole generation), so the
  text may run past the length the model was trained on.
- ``fusedmoe generate --model DIR --prompt "..."`` (with the directory's
  ``tokenizer.json``, through the ``tokenizers`` library) or ``--prompt-ids 1,2,3``:
  a model :func:`fusedmoe.hf.load_model` loads, continued with
  :func:`fusedmoe.generate.generate` over a KV cache; generation stops at the
  config's ``eos_token_id``.

Greedy (``--temperature 0``, the default) or sampled (temperature, optionally
only among the ``--top-k`` most likely tokens, or the ``--top-p`` nucleus).

Python API for runs: ``generate_text(run_dir, prompt, max_new_tokens=200,
temperature=0.0, top_k=0, seed=0) -> str``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_NEW_TOKENS = {"run": 200, "model": 64}


# ----------------------------------------------------------------------------- training runs
def sample_next(logits, key, temperature, top_k: int, greedy: bool | None = None):
    """One token id from ``logits [V]``: argmax when ``greedy`` (default:
    ``temperature == 0``, which then must be a Python number)."""
    import jax
    import jax.numpy as jnp

    if greedy is None:
        greedy = temperature == 0
    if greedy:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _next_token(graphdef, state, tokens, length, key, temperature, *, greedy, top_k):
    from flax import nnx

    logits, _ = nnx.merge(graphdef, state)(tokens[None])
    return sample_next(logits[0, length - 1], key, temperature, top_k, greedy)


_JITTED = {}


def _jitted_next_token():
    import jax

    if "f" not in _JITTED:  # one jitted function: compiled once per model shape and mode
        _JITTED["f"] = jax.jit(_next_token, static_argnames=("graphdef", "greedy", "top_k"))
    return _JITTED["f"]


def generate_tokens(model, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int = 0, seed: int = 0) -> list[int]:
    """Continue ``prompt`` (token ids) by ``max_new_tokens`` tokens with ``model``
    (a :class:`fusedmoe.model.MoEModel`) over a sliding window of ``max_seq_len``
    tokens. Returns only the new tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    window = model.config.max_seq_len
    graphdef, state = nnx.split(model)
    next_token = _jitted_next_token()
    greedy = temperature == 0
    history = list(prompt) or [ord("\n")]
    key = jax.random.key(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = history[-window:]
        # Right-padding is invisible to the causal model at position length - 1.
        buf = np.zeros((window,), np.int32)
        buf[: len(context)] = context
        key, sub = jax.random.split(key)
        token = int(next_token(graphdef, state, jnp.asarray(buf), len(context), sub,
                               np.float32(temperature), greedy=greedy, top_k=top_k))
        history.append(token)
        new.append(token)
    return new


def load_run_model(run_dir: str, step: int | None = None):
    """``(model, config, step)`` from the latest (or given) finalized checkpoint."""
    from flax import nnx

    from fusedmoe.model import MoEModel
    from fusedmoe.train.resume import restore_run

    state, config, step = restore_run(run_dir, step, params_only=True)
    model = nnx.eval_shape(lambda: MoEModel(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    abstract.replace_by_pure_dict(state["params"])
    return nnx.merge(graphdef, abstract), config, step


def generate_text(run_dir: str, prompt: str = "", max_new_tokens: int = 200, *,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                  step: int | None = None) -> str:
    """The text (bytes decoded as UTF-8, bad bytes replaced) that the model of
    ``run_dir`` writes after ``prompt``."""
    model, _, _ = load_run_model(run_dir, step)
    tokens = generate_tokens(model, list(prompt.encode("utf-8")), max_new_tokens,
                             temperature=temperature, top_k=top_k, seed=seed)
    return bytes(tokens).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", default=None,
                        help="the --out directory of a `fusedmoe train` run (or use --model)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a Hugging Face model directory (mixtral, qwen2_moe, qwen3_moe, "
                        "olmoe)")
    parser.add_argument("--prompt", default=None, help="text to continue (default: none)")
    parser.add_argument("--prompt-ids", default=None, metavar="IDS",
                        help="with --model: token ids to continue, comma-separated (1,2,3)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"tokens to generate (default {DEFAULT_NEW_TOKENS['run']} bytes for "
                        f"a run, {DEFAULT_NEW_TOKENS['model']} tokens for --model)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample only among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="with --model: sample only from the nucleus of this probability")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step of a run (default: the latest finalized)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="with --model: load in this dtype (default: the checkpoint's)")


def run(args: argparse.Namespace) -> int:
    from fusedmoe.errors import UsageError

    if (args.run_dir is None) == (args.model is None):
        raise UsageError("give either a run directory or --model DIR (exactly one)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: got {args.max_new_tokens}, expected >= 1")
    if args.temperature < 0:
        raise UsageError(f"--temperature: got {args.temperature}, expected >= 0")
    if args.top_k < 0:
        raise UsageError(f"--top-k: got {args.top_k}, expected >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p: got {args.top_p}, expected a number in (0, 1]")
    return _run_model(args) if args.model is not None else _run_training_run(args)


def _run_training_run(args: argparse.Namespace) -> int:
    from fusedmoe.checkpoint.run_checkpoint import finalized_run_steps
    from fusedmoe.errors import UsageError

    for flag, value in (("--prompt-ids", args.prompt_ids), ("--top-p", args.top_p),
                        ("--dtype", args.dtype)):
        if value is not None:
            raise UsageError(f"{flag}: applies to --model only")
    if not os.path.isdir(args.run_dir):
        raise UsageError(f"run_dir: got {args.run_dir!r}, expected an existing run directory")
    steps = finalized_run_steps(args.run_dir)
    if not steps:
        raise UsageError(f"run_dir: {args.run_dir!r} holds no finalized checkpoint, expected "
                         "the --out directory of a `fusedmoe train` run")
    if args.step is not None and args.step not in steps:
        raise UsageError(f"--step: got {args.step}, expected one of {steps}")
    if args.top_k > 256:
        raise UsageError(f"--top-k: got {args.top_k}, expected 0..256")
    prompt = args.prompt or ""
    text = generate_text(args.run_dir, prompt, args.max_new_tokens or DEFAULT_NEW_TOKENS["run"],
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                         step=args.step)
    print(prompt + text)
    return 0


def _prompt_ids(args: argparse.Namespace, model_dir: Path):
    """``(token ids, tokenizer or None)`` from --prompt or --prompt-ids."""
    from fusedmoe.errors import UsageError

    if (args.prompt is None) == (args.prompt_ids is None):
        raise UsageError("--model: give either --prompt TEXT or --prompt-ids 1,2,3 (exactly one)")
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids: got {args.prompt_ids!r}, expected comma-separated "
                             "token ids such as 1,2,3") from None
        if not ids or min(ids) < 0:
            raise UsageError(f"--prompt-ids: got {args.prompt_ids!r}, expected ids >= 0")
        return ids, None
    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise UsageError(f"--prompt: {model_dir} has no tokenizer.json; pass --prompt-ids")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError("--prompt: needs the `tokenizers` package (the hf extra: pip install "
                         "'fusedmoe[hf]'); or pass --prompt-ids") from None
    tokenizer = Tokenizer.from_file(str(file))
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise UsageError("--prompt: the tokenizer gives no tokens for it")
    return ids, tokenizer


def _run_model(args: argparse.Namespace) -> int:
    import numpy as np

    from fusedmoe import hf
    from fusedmoe.errors import CheckpointError, UsageError
    from fusedmoe.generate import generate

    if args.step is not None:
        raise UsageError("--step: applies to a run directory only")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model: {model_dir} is not a Hugging Face model directory "
                         "(no config.json)")
    ids, tokenizer = _prompt_ids(args, model_dir)
    try:
        model = hf.load_model(model_dir, dtype=args.dtype)
    except CheckpointError as exc:
        raise UsageError(f"--model: {exc}") from None
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        raise UsageError(f"--prompt-ids: id {max(ids)} is past the vocabulary ({vocab} tokens)")
    if args.top_k > vocab:
        raise UsageError(f"--top-k: got {args.top_k}, expected 0..{vocab}")
    eos = model.config.extra.get("eos_token_id")
    eos = [t for t in (eos if isinstance(eos, list) else [eos]) if isinstance(t, int) and t < vocab]
    out = generate(model, np.asarray([ids], np.int32),
                   args.max_new_tokens or DEFAULT_NEW_TOKENS["model"],
                   temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                   seed=args.seed, eos_token_id=eos or None)
    new = [int(t) for t in np.asarray(out[0, len(ids):])]  # ends at the first EOS
    if tokenizer is None:
        print(",".join(str(t) for t in ids + new))
    else:
        print(tokenizer.decode(ids + new))  # whole, so the tokenizer joins words its way
    return 0
