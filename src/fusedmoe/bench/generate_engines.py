"""What ``fusedmoe bench-generate`` runs and measures: the random model it builds
with transformers, the host memory each load takes, and the two engines it
times side by side (ours over the KV cache, transformers' ``generate``).

Each engine does the same two things, greedily:

- ``generate(prompt [B, P], new)``: the prompt in one forward pass (the
  prefill, which gives the first new token) then one decode step per further
  token; returns the tokens ``[B, P + new]``, the prefill's seconds and each
  decode step's seconds;
- ``decode_at(prompt [B, D], steps, capacity)``: the prefill of a ``D``-token
  prompt (untimed) then ``steps`` decode steps, timed: a decode step's cost with
  ``D`` tokens already in the cache.

Ours runs :func:`fusedmoe.generate.generate`'s own two compiled programs (the
prefill and the decode step, one compile per shape), blocking on each new
token to time it. Transformers' ``generate`` is timed by a streamer, which it
hands the prompt just before the prefill and then each new token as it is
made, so the times are those of ``generate`` itself.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Transformers' fastest CPU implementations (the bench peer's choice too): torch's
# grouped GEMM for the experts, torch's scaled-dot-product attention.
EXPERTS_IMPLEMENTATION = "grouped_mm"
ATTENTION_IMPLEMENTATION = "sdpa"


# ----------------------------------------------------------------------------- the model
def build_hf_model(path: Path, family: str, fields: dict[str, Any], dtype: str, seed: int) -> None:
    """A random ``family`` model of ``fields`` in ``dtype``, built by transformers from
    ``seed`` and saved at ``path`` (``save_pretrained``); the torch copy is freed."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.for_model(family, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    del model
    gc.collect()


def model_bytes(config) -> int:
    """Bytes of the parameters of a :class:`fusedmoe.model.Decoder` of ``config``
    (computed abstractly: nothing is allocated)."""
    import jax
    from flax import nnx

    from fusedmoe.model import Decoder

    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract)))


def decode_weight_bytes(config, batch: int) -> int:
    """Bytes of weights one decode step reads at most: every parameter but the
    experts, plus the experts ``batch`` tokens can route to (``top_k`` each, at
    most all of them), and one embedding row per token instead of the table."""
    import jax.numpy as jnp

    moe = config.moe
    itemsize = jnp.dtype(moe.weight_dtype).itemsize
    k, n, g = moe.emb_dim, moe.mlp_dim, moe.num_experts
    expert = 3 * k * n * itemsize
    routed = min(g, batch * moe.num_experts_per_tok)
    table = config.vocab_size * k * itemsize
    total = model_bytes(config) - config.num_moe_layers * (g - routed) * expert
    return total - table + batch * k * itemsize if not config.tie_embeddings else total


# ----------------------------------------------------------------------------- host memory
def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's record of this process's peak resident memory (VmHWM;
    Linux 4.0+). False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class LoadMemory:
    """Resident memory (MiB) around one load: before, its peak, after, and after the
    heap's free memory went back to the kernel (the model itself, with what the
    loader keeps: the ``fusedmoe`` command's malloc keeps freed memory, so without
    the trim a process holds its loading peak)."""

    before_mib: float
    peak_mib: float
    after_mib: float
    trimmed_mib: float
    seconds: float

    @property
    def peak_over_before_mib(self) -> float:
        return self.peak_mib - self.before_mib

    def fields(self) -> dict[str, float]:
        return {"load_rss_before_mib": self.before_mib, "load_rss_peak_mib": self.peak_mib,
                "load_rss_after_mib": self.after_mib, "load_rss_trimmed_mib": self.trimmed_mib,
                "load_peak_over_before_mib": self.peak_over_before_mib, "load_s": self.seconds}


def measure_load(load):
    """``(load(), LoadMemory)``. The heap's free memory is handed back to the kernel
    first (the ``fusedmoe`` command keeps freed memory, and a load that reuses it
    would not show), then the peak is reset, so the peak is this load's. Resident
    memory counts file pages mapped too (transformers maps the safetensors)."""
    from fusedmoe import allocator

    def trim() -> None:
        gc.collect()
        allocator.release_free_memory()

    trim()
    if not _reset_peak():
        raise RuntimeError("host memory: /proc/self/clear_refs cannot reset the peak here "
                           "(needs Linux 4.0+)")
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    result = load()
    seconds = time.perf_counter() - start
    peak, after = _status_mib("VmHWM"), _status_mib("VmRSS")
    trim()
    return result, LoadMemory(before, peak, after, _status_mib("VmRSS"), seconds)


def use_all_cores_in_torch() -> None:
    """torch gets as many threads as this process may use, the cores XLA runs on
    too (torch's default can differ, e.g. under a CPU quota or a taskset)."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))


# ----------------------------------------------------------------------------- engines
@dataclass
class Generation:
    tokens: np.ndarray  # [B, P + new] int
    prefill_s: float
    step_s: list[float]  # one per decode step after the prefill (new - 1)


class OurEngine:
    """A loaded :class:`fusedmoe.model.Decoder`, run by ``generate``'s programs."""

    def __init__(self, model):
        import jax
        from flax import nnx

        from fusedmoe.generate import Sampling

        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self.rule = Sampling(greedy=True, top_k=None, top_p=None)
        self.key, self.temperature = jax.random.key(0), np.float32(1.0)

    def _prefill(self, prompt: np.ndarray, capacity: int):
        import jax.numpy as jnp

        # The very programs fusedmoe.generate.generate runs (compiled once per shape).
        from fusedmoe.generate import _jitted

        cache = self.model.init_cache(prompt.shape[0], capacity)
        start = time.perf_counter()
        token, cache = _jitted("prefill")(self.graphdef, self.state, jnp.asarray(prompt),
                                          cache, self.key, self.temperature, rule=self.rule)
        token.block_until_ready()
        return token, cache, time.perf_counter() - start

    def _steps(self, token, cache, count: int):
        from fusedmoe.generate import _jitted

        step = _jitted("step")
        tokens, times = [token], []
        for _ in range(count):
            start = time.perf_counter()
            token, cache = step(self.graphdef, self.state, token, cache, self.key,
                                self.temperature, rule=self.rule)
            token.block_until_ready()
            times.append(time.perf_counter() - start)
            tokens.append(token)
        return tokens, times

    def generate(self, prompt: np.ndarray, new: int) -> Generation:
        token, cache, prefill_s = self._prefill(prompt, prompt.shape[1] + new)
        tokens, times = self._steps(token, cache, new - 1)
        made = np.stack([np.asarray(t) for t in tokens], axis=1)
        return Generation(np.concatenate([prompt, made], axis=1), prefill_s, times)

    def decode_at(self, prompt: np.ndarray, steps: int, capacity: int) -> list[float]:
        token, cache, _ = self._prefill(prompt, capacity)
        return self._steps(token, cache, steps)[1]


class _Clock:
    """A transformers streamer that notes the time of each ``put`` (the prompt,
    then each new token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TransformersEngine:
    """A transformers model, run by its own ``generate`` (greedy) and, for the
    decode cost at a depth, by the same forward calls over its ``DynamicCache``."""

    def __init__(self, model):
        self.model = model.eval()
        self.model.generation_config.eos_token_id = None  # always the tokens asked for
        self.model.generation_config.pad_token_id = 0

    def generate(self, prompt: np.ndarray, new: int) -> Generation:
        import torch

        clock = _Clock()
        with torch.inference_mode():
            out = self.model.generate(torch.from_numpy(prompt).long(), do_sample=False,
                                      max_new_tokens=new, min_new_tokens=new, streamer=clock)
        stamps = clock.times  # the prompt (just before the prefill), then each new token
        if len(stamps) != new + 1:
            raise RuntimeError(f"transformers generate: the streamer saw {len(stamps)} puts, "
                               f"expected {new + 1}")
        return Generation(out.numpy(), stamps[1] - stamps[0], list(np.diff(stamps[1:])))

    def decode_at(self, prompt: np.ndarray, steps: int, capacity: int) -> list[float]:
        import inspect

        import torch
        from transformers import DynamicCache

        # transformers 5.x renamed past_key_values to cache; the cache grows in place.
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
            else "past_key_values"
        cache = DynamicCache(config=self.model.config)
        times = []
        with torch.inference_mode():
            out = self.model(torch.from_numpy(prompt).long(), use_cache=True, **{name: cache})
            for _ in range(steps):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                start = time.perf_counter()
                out = self.model(token, use_cache=True, **{name: cache})
                times.append(time.perf_counter() - start)
        return times


def load_transformers(path: Path, dtype: str):
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=ATTENTION_IMPLEMENTATION,
        experts_implementation=EXPERTS_IMPLEMENTATION)
