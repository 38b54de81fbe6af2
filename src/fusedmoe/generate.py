"""Generation over the KV cache: a prefill, then one compiled decode step per token.

``generate(model, prompt [B, P] int32, max_new_tokens, *, temperature=0.0,
top_k=None, top_p=None, seed=0, eos_token_id=None, pad_token_id=None) ->
[B, P + max_new_tokens]`` for any :class:`fusedmoe.model.Decoder` (a loaded
Hugging Face model or the toy one).
The prompt runs once through :meth:`~fusedmoe.model.Decoder.decode` into an
empty cache; each new token is then one call of one jitted step that reads and
writes the cache in place (the cache's buffers are donated). The step is
compiled once per model, batch, cache size and sampling rule, not once per
position: positions live in the cache, as traced integers.

Sampling: ``temperature == 0`` is greedy (argmax, as transformers' greedy
``generate``); otherwise logits are divided by the temperature, cut to the
``top_k`` most likely and to the smallest set whose probability reaches
``top_p`` (transformers' order and rules), then sampled with a key derived from
``seed`` and the position.

End of sequence, as transformers' ``generate``: with ``eos_token_id`` (a token
id or several; a loaded model's is ``model.config.extra.get("eos_token_id")``)
a sequence that has produced one is continued with ``pad_token_id`` (default:
the first EOS id), and generation stops once every sequence has, so the
result may be shorter than ``P + max_new_tokens``. Without it (the default)
exactly ``max_new_tokens`` tokens are generated.

Text from a ``fusedmoe train`` run directory:
:func:`fusedmoe.generate_cli.generate_text`. The ``fusedmoe generate`` command
lives in :mod:`fusedmoe.generate_cli`.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Sampling(NamedTuple):
    """The static part of the sampling rule (a new combination compiles anew)."""

    greedy: bool
    top_k: int | None
    top_p: float | None


def sample(logits, key, temperature, rule: Sampling):
    """Token ids ``[B]`` int32 from ``logits [B, V]``."""
    import jax
    import jax.numpy as jnp

    logits = logits.astype(jnp.float32)
    if rule.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if rule.top_k is not None:
        kth = jax.lax.top_k(logits, rule.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if rule.top_p is not None:
        # transformers' TopPLogitsWarper: drop the least likely tokens whose total
        # probability stays within 1 - top_p; the most likely one always stays.
        order = jnp.argsort(logits, axis=-1)
        ascending = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        drop = (cumulative <= 1 - rule.top_p).at[:, -1].set(False)
        rows = jnp.arange(logits.shape[0])[:, None]
        drop = jnp.zeros_like(drop).at[rows, order].set(drop)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prefill(graphdef, state, prompt, cache, key, temperature, *, rule):
    from flax import nnx

    logits, cache = nnx.merge(graphdef, state).decode(prompt, cache)
    return sample(logits[:, -1], key, temperature, rule), cache


def _decode_step(graphdef, state, token, cache, key, temperature, *, rule):
    """One new token per sequence: ``token [B]`` in, the next ``[B]`` out."""
    import jax
    from flax import nnx

    logits, cache = nnx.merge(graphdef, state).decode(token[:, None], cache)
    key = jax.random.fold_in(key, cache.length)
    return sample(logits[:, -1], key, temperature, rule), cache


_JITTED: dict[str, Any] = {}


def _jitted(name: str):
    """The jitted prefill or decode step (one function each: jax caches its compilations)."""
    import jax

    if name not in _JITTED:
        fn = {"prefill": _prefill, "step": _decode_step}[name]
        _JITTED[name] = jax.jit(fn, static_argnames=("graphdef", "rule"),
                                donate_argnames=("cache",))
    return _JITTED[name]


def _token_ids(name: str, value, vocab: int) -> tuple[int, ...]:
    """``value`` (None, an id or a sequence of ids) as a tuple of ids in the vocabulary."""
    ids = () if value is None else (value,) if isinstance(value, int) else tuple(value)
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab for i in ids):
        raise ValueError(f"{name}: expected None, a token id or a list of them, each in "
                         f"0..{vocab - 1}, got {value!r}")
    return ids


def _check(model, prompt, max_new_tokens, temperature, top_k, top_p):
    import jax.numpy as jnp

    from fusedmoe.model import Decoder

    if not isinstance(model, Decoder):
        raise TypeError(f"model: expected a fusedmoe.model.Decoder, got {type(model).__name__}")
    shape = getattr(prompt, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] < 1:
        raise ValueError(f"prompt: expected token ids [batch, length >= 1], got shape {shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt: expected integer token ids, got dtype {prompt.dtype}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, int | float) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0 (0 = greedy), got {temperature!r}")
    vocab = model.config.vocab_size
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k: expected None or an int in 1..{vocab}, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def generate(model, prompt, max_new_tokens: int = 200, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_id=None, pad_token_id: int | None = None):
    """``prompt [B, P]`` continued by ``max_new_tokens`` tokens: ``[B, P + max_new_tokens]``
    int32 (fewer where every sequence reached ``eos_token_id``). See the module
    docstring."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    prompt = jnp.asarray(prompt) if isinstance(prompt, np.ndarray | list) else prompt
    _check(model, prompt, max_new_tokens, temperature, top_k, top_p)
    vocab = model.config.vocab_size
    eos = _token_ids("eos_token_id", eos_token_id, vocab)
    if pad_token_id is not None and not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id: expected None or one token id, got {pad_token_id!r}")
    pad = (_token_ids("pad_token_id", pad_token_id, vocab) or eos[:1] or (0,))[0]
    prompt = prompt.astype(jnp.int32)
    batch, length = prompt.shape
    rule = Sampling(greedy=temperature == 0, top_k=top_k, top_p=top_p)
    temperature = np.float32(temperature or 1.0)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(batch, length + max_new_tokens)
    key = jax.random.key(seed)
    token, cache = _jitted("prefill")(graphdef, state, prompt, cache, key, temperature, rule=rule)
    tokens = [token]
    eos_ids = jnp.asarray(eos, jnp.int32)
    ended = jnp.isin(token, eos_ids) if eos else None
    step = _jitted("step")
    for _ in range(max_new_tokens - 1):
        if ended is not None and bool(ended.all()):  # (a wait for the step, only with eos)
            break
        token, cache = step(graphdef, state, token, cache, key, temperature, rule=rule)
        if ended is not None:
            token = jnp.where(ended, pad, token)
            ended = ended | jnp.isin(token, eos_ids)
        tokens.append(token)
    return jnp.concatenate([prompt, jnp.stack(tokens, axis=1)], axis=1)
