"""``fusedmoe generate``: text from a checkpoint written by ``fusedmoe train``.

Greedy (``--temperature 0``) or sampled (temperature, optionally only among the
``--top-k`` most likely bytes). The model has no KV cache: each new byte runs
the model over a fixed window of the last ``max_seq_len`` bytes (one compiled
function for the whole generation), which is plenty for the small models
trained here.

Python API: ``generate(run_dir, prompt, max_new_tokens=200, temperature=0.0,
top_k=0, seed=0) -> str``.
"""

from __future__ import annotations

import argparse
import os


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
    (a :class:`fusedmoe.model.MoEModel`). Returns only the new tokens."""
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


def load_model(run_dir: str, step: int | None = None):
    """``(model, config, step)`` from the latest (or given) finalized checkpoint."""
    from flax import nnx

    from fusedmoe.model import MoEModel
    from fusedmoe.train.resume import restore_run

    state, config, step = restore_run(run_dir, step, params_only=True)
    model = nnx.eval_shape(lambda: MoEModel(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    abstract.replace_by_pure_dict(state["params"])
    return nnx.merge(graphdef, abstract), config, step


def generate(run_dir: str, prompt: str = "", max_new_tokens: int = 200, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             step: int | None = None) -> str:
    """The text (bytes decoded as UTF-8, bad bytes replaced) that the model of
    ``run_dir`` writes after ``prompt``."""
    model, _, _ = load_model(run_dir, step)
    tokens = generate_tokens(model, list(prompt.encode("utf-8")), max_new_tokens,
                             temperature=temperature, top_k=top_k, seed=seed)
    return bytes(tokens).decode("utf-8", errors="replace")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the --out directory of a `fusedmoe train` run")
    parser.add_argument("--prompt", default="", help="text to continue (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample only among the k most likely bytes (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step (default: the latest finalized)")


def run(args: argparse.Namespace) -> int:
    from fusedmoe.checkpoint.run_checkpoint import finalized_run_steps
    from fusedmoe.errors import UsageError

    if not os.path.isdir(args.run_dir):
        raise UsageError(f"run_dir: got {args.run_dir!r}, expected an existing run directory")
    steps = finalized_run_steps(args.run_dir)
    if not steps:
        raise UsageError(f"run_dir: {args.run_dir!r} holds no finalized checkpoint, expected "
                         "the --out directory of a `fusedmoe train` run")
    if args.step is not None and args.step not in steps:
        raise UsageError(f"--step: got {args.step}, expected one of {steps}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: got {args.max_new_tokens}, expected >= 1")
    if args.temperature < 0:
        raise UsageError(f"--temperature: got {args.temperature}, expected >= 0")
    if not 0 <= args.top_k <= 256:
        raise UsageError(f"--top-k: got {args.top_k}, expected 0..256")
    text = generate(args.run_dir, args.prompt, args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                    step=args.step)
    print(args.prompt + text)
    return 0
