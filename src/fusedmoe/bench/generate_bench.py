"""``fusedmoe bench-generate``: a whole model generating text, fused and unfused,
side by side with transformers' ``generate`` on the same weights and prompt.

The model (``--model``, :data:`MODELS`) is random, at a real layer width:

- ``qwen3_moe`` (the default): Qwen3-30B-A3B's layer (hidden 2048, 32 query and
  4 key/value heads of 128, 128 experts of mlp width 768, top-8), two layers, a
  vocabulary of 4096: about 1.25 billion parameters, 4.7 GiB in float32;
- ``deepseek_v3``: DeepSeek-V3's shape at a reduced width: multi-head latent
  attention with its own ranks and head dims (q rank 1536, latent 512, per head
  128 + 64 query/key and 128 value dims) on 16 heads of hidden 2048, yarn RoPE
  as the release sets it, a dense first layer then two MoE layers of 256
  experts (mlp width 256) in 8 groups (4 chosen), top-8, sigmoid routing with
  its correction bias, a shared expert; a vocabulary of 4096: 3.4 GiB in float32.

transformers builds it from its config class and a fixed seed and saves it
(``save_pretrained``) to a temporary directory; :func:`fusedmoe.hf.load_model`
loads it fused and unfused, transformers' ``from_pretrained`` once more (its
grouped-GEMM experts and SDPA attention, the fastest it has on CPU). All three
copies stay loaded, so the run needs about three times the model's size (it
refuses to start where ``MemAvailable`` is short; ``--dtype bfloat16`` halves it).

Measured, every engine greedy, in this one process:

- host memory while loading: resident memory before, at its peak and after each
  load (the peak reset just before it, the heap's free memory handed back first);
- prefill tokens/s (the prompt, ``B x P`` tokens, in one pass, giving the first
  new token) and decode tokens/s (``B`` over the median decode step), in
  ``--repeats`` rounds that alternate the engines (each round in another order),
  after an untimed round that compiles; ratios to transformers are the medians'
  and the median of the per-round ratios (paired);
- the decode step's time with 64 and with 512 tokens already in the cache
  (``--depths``): each a prefill of that many tokens then ``--depth-steps`` timed
  steps, alternating the engines too. Ours runs over the same fixed-size cache
  at both depths (as ``generate`` does for one generation that long), so a step
  costs the same wherever it is; transformers' cache grows;
- whether our greedy tokens equal transformers' (in bfloat16 rounding may pick
  another token at a near tie, and from there the texts part);
- the bytes of weights one decode step reads at most (all but the experts, plus
  the ``top_k`` experts of each token) over the step's time: the read bandwidth
  the step achieves, to hold against the machine's;
- the KV cache's bytes per token (of one sequence, every layer): ours
  (:meth:`fusedmoe.model.Decoder.cache_bytes_per_token`: DeepSeek-V3's latent)
  and full keys and values (``expanded=True``), which is what transformers' cache
  holds.

``--quick`` runs a tiny model in seconds (the tests'). The JSON record
(``--json``) and the environment line are those of the other bench commands
(:mod:`fusedmoe.bench.record`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from fusedmoe.bench import options
from fusedmoe.errors import UsageError


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """One model ``--model`` can choose: a transformers family and its config fields."""

    family: str  # model_type, as transformers' AutoConfig knows it
    full: dict[str, Any]  # the measured model's config fields
    quick: dict[str, Any]  # a tiny one of the same kind (--quick)


_COMMON = dict(norm_topk_prob=True, rms_norm_eps=1e-6, tie_word_embeddings=False,
               max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)
# DeepSeek-V3's RoPE as its release sets it (yarn, 40 x 4096 positions).
_DEEPSEEK_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                      original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                      mscale=1.0, mscale_all_dim=1.0)
# DeepSeek-V3's routing and the rest it fixes; no multi-token prediction layers.
_DEEPSEEK = dict(_COMMON, max_position_embeddings=163840, rope_parameters=_DEEPSEEK_YARN,
                 routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1,
                 num_hidden_layers=3, num_nextn_predict_layers=0)
MODELS = {
    # Qwen3-30B-A3B's layer, two layers of it, a small vocabulary.
    "qwen3_moe": BenchModel(
        "qwen3_moe",
        full=dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                  moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                  num_experts_per_tok=8, num_hidden_layers=2, vocab_size=4096, **_COMMON),
        quick=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   moe_intermediate_size=32, intermediate_size=96, num_experts=8,
                   num_experts_per_tok=2, num_hidden_layers=2, vocab_size=256, **_COMMON)),
    # DeepSeek-V3 narrowed to hidden 2048 (its 7168 with 256 experts of 2048 would
    # not fit): its attention ranks and head dims on 16 heads, 256 experts of mlp 256
    # in 8 groups, top-8; a dense layer, then two MoE layers.
    "deepseek_v3": BenchModel(
        "deepseek_v3",
        full=dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
                  q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128, n_routed_experts=256, n_group=8, topk_group=4,
                  num_experts_per_tok=8, moe_intermediate_size=256, intermediate_size=6144,
                  vocab_size=4096, **_DEEPSEEK),
        quick=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48,
                   kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                   moe_intermediate_size=16, intermediate_size=96, vocab_size=256, **_DEEPSEEK)),
}
DEFAULT_MODEL = "qwen3_moe"
DEFAULTS = dict(prompt_len=64, new_tokens=64, depths=(64, 512), depth_steps=8, repeats=3)
QUICK_DEFAULTS = dict(prompt_len=16, new_tokens=8, depths=(16, 64), depth_steps=4, repeats=1)
ENGINES = ("fused", "unfused", "transformers")
DTYPES = ("float32", "bfloat16")
MEMORY_MARGIN = 1.5 * 2**30  # compiled programs, activations, the interpreter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, q = DEFAULTS, QUICK_DEFAULTS
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                        help=f"the model: {' or '.join(MODELS)} (default {DEFAULT_MODEL})")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model of the same kind (hidden 64): a smoke run in seconds")
    parser.add_argument("--dtype", default="float32", metavar="DTYPE",
                        help="float32/f32 or bfloat16/bf16 (default float32)")
    parser.add_argument("--backend", default="auto", metavar="NAME",
                        help="our grouped-matmul backend (default auto)")
    parser.add_argument("--batch", default="1", metavar="B", help="sequences (default 1)")
    parser.add_argument("--prompt-len", default=None, metavar="P",
                        help=f"prompt tokens (default {d['prompt_len']}; {q['prompt_len']} "
                             "with --quick)")
    parser.add_argument("--new-tokens", default=None, metavar="N",
                        help=f"tokens to generate, >= 2 (default {d['new_tokens']}; "
                             f"{q['new_tokens']} with --quick)")
    options.add_list_option(parser, "--depths", metavar="D",
                            help="tokens in the cache at which a decode step is timed",
                            default=f"{','.join(map(str, d['depths']))}; "
                                    f"{','.join(map(str, q['depths']))} with --quick")
    parser.add_argument("--depth-steps", default=None, metavar="S",
                        help=f"decode steps timed at each depth (default {d['depth_steps']}; "
                             f"{q['depth_steps']} with --quick)")
    parser.add_argument("--repeats", default=None, metavar="N",
                        help=f"timed rounds, median (default {d['repeats']}; "
                             f"{q['repeats']} with --quick)")
    parser.add_argument("--seed", default="0", help="the model's weights and the prompts")
    parser.add_argument("--dir", default=None, metavar="DIR",
                        help="where the model is saved (default: a temporary directory, "
                             "removed at the end); a DIR that holds this very model is reused")
    parser.add_argument("--json", metavar="PATH",
                        help="write the rows and the environment as JSON")


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class GeneratePlan:
    """Every setting of a run, checked (:func:`plan_from_args`)."""

    model: str  # a key of MODELS
    fields: dict[str, Any]  # the transformers config fields of the model
    quick: bool
    dtype: str
    backend: str
    batch: int
    prompt_len: int
    new_tokens: int
    depths: tuple[int, ...]
    depth_steps: int
    repeats: int
    seed: int
    model_dir: str | None
    json_path: str | None

    @property
    def family(self) -> str:
        return MODELS[self.model].family

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "family": self.family}

    @property
    def capacity(self) -> int:
        """The cache of the depth measurements: room for the deepest and its steps."""
        return max(self.depths) + self.depth_steps


def plan_from_args(args) -> GeneratePlan:
    """Every option checked before any work starts; raises ``UsageError``."""
    from fusedmoe.grouped_matmul.registry import backend_names

    defaults = QUICK_DEFAULTS if args.quick else DEFAULTS
    if args.model not in MODELS:
        raise UsageError(f"--model: got {args.model!r}, expected one of {', '.join(MODELS)}")
    dtype = options.DTYPE_NAMES.get(args.dtype)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: got {args.dtype!r}, expected float32/f32 or bfloat16/bf16")
    if args.backend not in backend_names():
        raise UsageError(f"--backend: got {args.backend!r}, expected one of "
                         f"{', '.join(backend_names())}")
    pick = lambda opt, text, key, minimum=1: (  # noqa: E731
        defaults[key] if text is None else options.positive_int(opt, text, minimum))
    fields = MODELS[args.model].quick if args.quick else MODELS[args.model].full
    plan = GeneratePlan(
        model=args.model, fields=fields, quick=args.quick, dtype=dtype, backend=args.backend,
        batch=options.positive_int("--batch", args.batch),
        prompt_len=pick("--prompt-len", args.prompt_len, "prompt_len"),
        new_tokens=pick("--new-tokens", args.new_tokens, "new_tokens", 2),
        depths=options.positive_ints("--depths", args.depths, defaults["depths"]),
        depth_steps=pick("--depth-steps", args.depth_steps, "depth_steps"),
        repeats=pick("--repeats", args.repeats, "repeats"),
        seed=options.positive_int("--seed", args.seed, 0),
        model_dir=_model_dir(args.dir), json_path=options.output_path("--json", args.json, "JSON"),
    )
    limit = fields["max_position_embeddings"]
    if plan.prompt_len + plan.new_tokens > limit:
        raise UsageError(f"--prompt-len/--new-tokens: {plan.prompt_len} + {plan.new_tokens} "
                         f"tokens exceed the model's {limit} positions")
    if plan.capacity > limit:
        raise UsageError(f"--depths/--depth-steps: {max(plan.depths)} + {plan.depth_steps} "
                         f"tokens exceed the model's {limit} positions")
    if plan.model_dir and os.path.isdir(plan.model_dir) and os.listdir(plan.model_dir) \
            and not _holds_model(plan):
        raise UsageError(f"--dir: {args.dir!r} holds other files; expected an empty or new "
                         "directory, or one where this command saved the same model")
    _check_peer()
    _check_room(plan)
    return plan


def _model_dir(text: str | None) -> str | None:
    if text is None:
        return None
    if os.path.exists(text) and not os.path.isdir(text):
        raise UsageError(f"--dir: {text!r} is a file; expected a directory")
    return os.path.abspath(text)


def _check_peer() -> None:
    try:  # transformers builds the model, so it is needed either way
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception as exc:
        raise UsageError(f"bench-generate needs torch and transformers ({exc.__class__.__name__}:"
                         f" {exc}); pip install '.[hf]'") from None


def hf_config(plan: GeneratePlan) -> dict[str, Any]:
    """The plan's model's ``config.json`` as transformers writes it (its config class
    fills in every field the plan leaves out)."""
    import transformers

    return transformers.AutoConfig.for_model(plan.family, **plan.fields).to_dict()


def model_config(plan: GeneratePlan, fused: bool = True):
    """Our :class:`~fusedmoe.model.ModelConfig` of the plan's model."""
    from fusedmoe import hf

    return hf.model_config(hf_config(plan), fused_moe_mlp=fused, dtype=plan.dtype,
                           gmm_backend=plan.backend)


def _check_room(plan: GeneratePlan) -> None:
    """Refuse a run that would not fit: three copies in memory and loading's
    temporaries, one copy on disk. Our loader holds one tensor beyond the model;
    transformers' peaks at about 2.4 times the model (Qwen3, float32), much of it
    the safetensors pages it maps, which the kernel can drop: two layers' worth
    is allowed."""
    from fusedmoe.bench.generate_engines import model_bytes

    config = model_config(plan)
    size = model_bytes(config)
    layer = size / max(1, config.num_layers)
    need = 3 * size + 2 * layer + MEMORY_MARGIN
    available = _mem_available()
    if available is not None and need > available:
        raise UsageError(f"--dtype: the {plan.dtype} model takes {size / 2**30:.1f} GiB; three "
                         f"copies and loading need about {need / 2**30:.1f} GiB, and "
                         f"{available / 2**30:.1f} GiB are available"
                         + ("; try --dtype bfloat16" if plan.dtype == "float32" else ""))
    where = plan.model_dir or tempfile.gettempdir()
    while not os.path.exists(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if not _holds_model(plan) and free < size * 1.05:
        raise UsageError(f"--dir: the model takes {size / 2**30:.1f} GiB on disk; {where} has "
                         f"{free / 2**30:.1f} GiB free")


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _holds_model(plan: GeneratePlan) -> bool:
    """Whether ``plan.model_dir`` already holds the model of this plan (same config
    fields, dtype and seed, as recorded when it was saved)."""
    if plan.model_dir is None:
        return False
    try:
        with open(os.path.join(plan.model_dir, SAVED_AS)) as f:
            import json

            return json.load(f) == _identity(plan)
    except (OSError, ValueError):
        return False


SAVED_AS = "fusedmoe_bench_model.json"


def _identity(plan: GeneratePlan) -> dict[str, Any]:
    return {"family": plan.family, "fields": plan.fields, "dtype": plan.dtype, "seed": plan.seed}


# ----------------------------------------------------------------------------- the run
def run(args) -> int:
    plan = plan_from_args(args)
    from fusedmoe.bench import record
    from fusedmoe.bench.generate_engines import use_all_cores_in_torch

    use_all_cores_in_torch()
    env = record.environment()
    print(record.environment_line(env), flush=True)
    print(describe(plan), flush=True)

    def save(rows, complete):
        if plan.json_path:
            record.write_rows(plan.json_path, env, plan.as_json(), rows, complete)

    rows = run_plan(plan, save)
    print_table(rows, plan)
    return 0


def describe(plan: GeneratePlan) -> str:
    from fusedmoe.bench.generate_engines import model_bytes

    c = model_config(plan)
    m = c.moe
    if c.attention == "mla":
        attention = (f"multi-head latent attention, {c.num_heads} heads (q rank {c.q_lora_rank}, "
                     f"latent {c.kv_lora_rank}, q/k {c.qk_nope_head_dim}+{c.qk_rope_head_dim}, "
                     f"v {c.v_head_dim})")
    else:
        attention = f"{c.num_heads} query and {c.kv_heads} key/value heads of {c.head_size}"
    shared = f" and {m.shared_mlp_dim // m.mlp_dim} shared" if m.shared_mlp_dim else ""
    return (f"{plan.model}: {c.num_layers} layers ({c.num_moe_layers} MoE), hidden {c.emb_dim}, "
            f"{attention}, {m.num_experts} experts top-{m.num_experts_per_tok}{shared} of mlp "
            f"{m.mlp_dim}, vocabulary {c.vocab_size}; {model_bytes(c) / 2**30:.2f} GiB in "
            f"{plan.dtype}; batch {plan.batch}, prompt {plan.prompt_len}, {plan.new_tokens} new "
            f"tokens, decode steps timed at {', '.join(map(str, plan.depths))} cached tokens; "
            f"{plan.repeats} round(s)")


def run_plan(plan: GeneratePlan, save=lambda rows, complete: None) -> list[dict[str, Any]]:
    """Build (or reuse) the model, load it three times, then time the engines; the
    rows, one per engine. ``save(rows, complete)`` is called after each phase."""
    directory = plan.model_dir or tempfile.mkdtemp(prefix="fusedmoe-bench-generate-")
    try:
        engines, loads = _load_engines(plan, Path(directory))
        rows = [_base_row(plan, name, loads[name]) for name in ENGINES]
        save(rows, False)
        _time_generation(plan, engines, rows)
        save(rows, False)
        _time_depths(plan, engines, rows)
        _compare(rows)
        save(rows, True)
        return rows
    finally:
        if plan.model_dir is None:
            shutil.rmtree(directory, ignore_errors=True)


def _load_engines(plan: GeneratePlan, directory: Path):
    """name -> engine, and name -> :class:`LoadMemory`."""
    import json

    from fusedmoe import hf
    from fusedmoe.bench import generate_engines as ge

    if not _holds_model(plan):
        print(f"building the model with transformers (seed {plan.seed}) in {directory}",
              flush=True)
        ge.build_hf_model(directory, plan.family, plan.fields, plan.dtype, plan.seed)
        (directory / SAVED_AS).write_text(json.dumps(_identity(plan)))
    engines, loads = {}, {}
    for name in ENGINES:
        if name == "transformers":
            model, loads[name] = ge.measure_load(lambda: ge.load_transformers(directory,
                                                                              plan.dtype))
            engines[name] = ge.TransformersEngine(model)
        else:
            model, loads[name] = ge.measure_load(lambda name=name: hf.load_model(
                directory, fused_moe_mlp=name == "fused", gmm_backend=plan.backend))
            engines[name] = ge.OurEngine(model)
        print(f"loaded {name}: {loads[name].seconds:.1f} s, peak resident memory "
              f"+{loads[name].peak_over_before_mib:.0f} MiB", flush=True)
    return engines, loads


def _rotations(n: int, rounds: int) -> list[list[int]]:
    """Round r runs the engines starting from engine r mod n: each goes first as often."""
    return [[(r + i) % n for i in range(n)] for r in range(rounds)]


def _prompt(plan: GeneratePlan, length: int, salt: int):
    import numpy as np

    rng = np.random.default_rng([plan.seed, salt, length])
    return rng.integers(0, plan.fields["vocab_size"], (plan.batch, length)).astype(np.int32)


def _time_generation(plan: GeneratePlan, engines, rows) -> None:
    """Warm-up (compile) round, then ``repeats`` alternating rounds of each engine's
    generation of ``new_tokens`` from the same prompt."""
    prompt = _prompt(plan, plan.prompt_len, 0)
    names = list(engines)
    results: dict[str, list] = {name: [] for name in names}
    for name in names:
        print(f"warm-up: {name} generates", flush=True)
        results[name].append(engines[name].generate(prompt, plan.new_tokens))
    for order in _rotations(len(names), plan.repeats):
        for i in order:
            results[names[i]].append(engines[names[i]].generate(prompt, plan.new_tokens))
    for row in rows:
        timed = results[row["engine"]][1:]
        row["first_prefill_s"] = results[row["engine"]][0].prefill_s
        row["prefill_times_s"] = [g.prefill_s for g in timed]
        row["prefill_s"] = statistics.median(row["prefill_times_s"])
        row["prefill_tokens_per_s"] = plan.batch * plan.prompt_len / row["prefill_s"]
        row["decode_round_s"] = [statistics.median(g.step_s) for g in timed]
        row["decode_step_s"] = statistics.median(row["decode_round_s"])
        row["decode_tokens_per_s"] = plan.batch / row["decode_step_s"]
        row["weight_gb_per_s"] = row["decode_weight_bytes"] / row["decode_step_s"] / 1e9
        row["tokens"] = results[row["engine"]][0].tokens[:, plan.prompt_len:].tolist()


def _time_depths(plan: GeneratePlan, engines, rows) -> None:
    """The decode step at each depth: an untimed pass per depth (compiling its
    prefill), then ``repeats`` alternating rounds of ``depth_steps`` timed steps."""
    names = list(engines)
    prompts = {d: _prompt(plan, d, 1) for d in plan.depths}
    times: dict[tuple[str, int], list[float]] = {(n, d): [] for n in names for d in plan.depths}
    for name in names:
        print(f"warm-up: {name} at depths {list(plan.depths)}", flush=True)
        for d in plan.depths:
            engines[name].decode_at(prompts[d], 1, plan.capacity)
    for order in _rotations(len(names), plan.repeats):
        for i in order:
            for d in plan.depths:
                steps = engines[names[i]].decode_at(prompts[d], plan.depth_steps, plan.capacity)
                times[names[i], d].append(statistics.median(steps))
    low, high = min(plan.depths), max(plan.depths)
    for row in rows:
        at = {d: statistics.median(times[row["engine"], d]) for d in plan.depths}
        row["decode_s_at_depth"] = {str(d): s for d, s in at.items()}
        row["decode_depth_growth"] = at[high] / at[low]
        row["depth_capacity"] = plan.capacity if row["engine"] != "transformers" else None


def _base_row(plan: GeneratePlan, name: str, load) -> dict[str, Any]:
    from fusedmoe.bench.generate_engines import (
        ATTENTION_IMPLEMENTATION,
        EXPERTS_IMPLEMENTATION,
        decode_weight_bytes,
        model_bytes,
    )
    from fusedmoe.grouped_matmul.registry import auto_backend
    from fusedmoe.model import cache_bytes_per_token

    config = model_config(plan, fused=name == "fused")
    full_kv = cache_bytes_per_token(config, expanded=True)
    if name == "transformers":
        how = f"experts {EXPERTS_IMPLEMENTATION}, attention {ATTENTION_IMPLEMENTATION}"
    else:
        used = plan.backend
        if used == "auto":
            import jax

            used = auto_backend(jax.default_backend(), plan.dtype)
        how = f"backend {used}"
    return {
        "engine": name, "implementation": how, "model": plan.model, "family": plan.family,
        "dtype": plan.dtype, "batch": plan.batch, "prompt_len": plan.prompt_len,
        "new_tokens": plan.new_tokens, "model_bytes": model_bytes(config),
        "decode_weight_bytes": decode_weight_bytes(config, plan.batch),
        # transformers caches every head's keys and values, whatever the attention
        "cache_bytes_per_token": full_kv if name == "transformers"
        else cache_bytes_per_token(config),
        "cache_bytes_per_token_full_kv": full_kv,
        **load.fields(),
    }


def _compare(rows: list[dict[str, Any]]) -> None:
    """Ours against transformers: the speed-ups (of the medians, and paired round by
    round) and whether the greedy tokens are the same."""
    from fusedmoe.bench.timing import paired_ratio

    peer = next(r for r in rows if r["engine"] == "transformers")
    for row in rows:
        if row is peer:
            continue
        for what, times in (("prefill", "prefill_times_s"), ("decode", "decode_round_s")):
            median = "prefill_s" if what == "prefill" else "decode_step_s"
            row[f"{what}_speedup"] = peer[median] / row[median]
            row[f"{what}_speedup_paired"] = paired_ratio(peer[times], row[times])
        ours, theirs = row["tokens"], peer["tokens"]
        row["same_tokens"] = ours == theirs
        row["first_difference"] = None if ours == theirs else min(
            i for seq_a, seq_b in zip(ours, theirs) for i, (a, b) in enumerate(zip(seq_a, seq_b))
            if a != b)


# ----------------------------------------------------------------------------- output
def _cells(row: dict[str, Any], plan: GeneratePlan) -> list[str]:
    def speedup(what):
        if f"{what}_speedup" not in row:
            return "-"
        return f"{row[f'{what}_speedup']:.2f}x ({row[f'{what}_speedup_paired']:.2f}x)"

    depth = [f"{row['decode_s_at_depth'][str(d)] * 1e3:.1f}" for d in plan.depths]
    same = "-" if "same_tokens" not in row else "yes" if row["same_tokens"] else (
        f"no (from token {row['first_difference']})")
    return [
        row["engine"], row["implementation"],
        f"{row['prefill_tokens_per_s']:,.0f}", speedup("prefill"),
        f"{row['decode_tokens_per_s']:,.1f}", speedup("decode"),
        *depth, f"{row['decode_depth_growth']:.2f}",
        f"{row['weight_gb_per_s']:.1f}", f"{row['cache_bytes_per_token']:,}",
        f"+{row['load_peak_over_before_mib']:,.0f} ({row['model_bytes'] / 2**20:,.0f})",
        same,
    ]


def print_table(rows: list[dict[str, Any]], plan: GeneratePlan) -> None:
    from rich.console import Console
    from rich.table import Table

    low, high = min(plan.depths), max(plan.depths)
    columns = ["engine", "implementation", "prefill tok/s", "x transformers (paired)",
               "decode tok/s", "x transformers (paired)",
               *[f"ms/step @{d} cached" for d in plan.depths], f"@{high} / @{low}",
               "weights read GB/s", "KV cache B/token", "load: peak +MiB (model MiB)",
               "same tokens"]
    table = Table(title=f"fusedmoe bench-generate: {plan.model} {plan.dtype}, batch {plan.batch}, "
                        f"prompt {plan.prompt_len}, {plan.new_tokens} new tokens (greedy); "
                        "medians of the rounds, paired = median of per-round ratios")
    for col in columns:
        left = col in ("engine", "implementation")
        table.add_column(col, justify="left" if left else "right", no_wrap=left)
    for row in rows:
        table.add_row(*_cells(row, plan))
    Console(width=max(200, Console().width)).print(table)


if __name__ == "__main__":  # pragma: no cover
    from fusedmoe.cli import main

    sys.exit(main(["bench-generate", *sys.argv[1:]]))
