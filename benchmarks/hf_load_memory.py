"""Host memory while ``fusedmoe.hf.load_model`` loads a model, against the model's size.

Builds a random Qwen3-MoE model with transformers (float32, from seed 0, sharded
at 2 GB, as real checkpoints are; kept in ``--dir`` for later runs), then loads it
in a fresh process and prints that process's resident memory before, at its
peak, and after (also after ``malloc_trim``, which returns the heap that freed
temporaries left behind)::

    python benchmarks/hf_load_memory.py [--model small|mid|qwen3] [--dir DIR] [--unfused]

The models (``--model``):

- ``small``: 4 layers of 32 experts (hidden 512, mlp 256), vocabulary 32000:
  329 MiB, most of it the embedding and the LM head;
- ``mid``: 6 layers of 64 experts (hidden 1024, mlp 384), vocabulary 8192:
  1.8 GiB, nearly all of it experts;
- ``qwen3``: ``fusedmoe bench-generate``'s model (two Qwen3-30B-A3B layers: hidden
  2048, 128 experts of mlp 768, vocabulary 4096): 4.7 GiB.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import ctypes, gc, json, resource, sys, time
import jax, jax.numpy as jnp
from flax import nnx
from fusedmoe import hf
import fusedmoe.layer, fusedmoe.model
jnp.zeros(1).block_until_ready()

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

before = rss()
start = time.perf_counter()
model = hf.load_model(sys.argv[1], fused_moe_mlp=sys.argv[2] == "fused")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
after = rss()
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
size = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) / 2**20
print(json.dumps(dict(model_mib=size, before_mib=before, peak_mib=peak, after_mib=after,
                      trimmed_mib=rss(), seconds=seconds)))
"""

_COMMON = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts_per_tok=4,
               max_position_embeddings=1024)
MODELS = {
    "small": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4,
                  moe_intermediate_size=256, num_experts=32, intermediate_size=1024, **_COMMON),
    "mid": dict(vocab_size=8192, hidden_size=1024, num_hidden_layers=6,
                moe_intermediate_size=384, num_experts=64, intermediate_size=2048, **_COMMON),
}


def fields_of(name: str) -> dict:
    if name == "qwen3":
        from fusedmoe.bench.generate_bench import MODELS

        return dict(MODELS["qwen3_moe"].full)
    return MODELS[name]


def build(path: Path, fields: dict) -> None:
    import torch
    import transformers

    config = transformers.AutoConfig.for_model("qwen3_moe", **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="2GB")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("small", "mid", "qwen3"), default="small")
    parser.add_argument("--dir", default=None,
                        help="where the model is (default /tmp/fusedmoe-load-memory-MODEL)")
    parser.add_argument("--unfused", action="store_true")
    args = parser.parse_args()
    path = Path(args.dir or f"/tmp/fusedmoe-load-memory-{args.model}")
    if not (path / "config.json").is_file():
        # Built in a process of its own, so the torch copy is gone before the load.
        subprocess.run([sys.executable, __file__, "--build", str(path), args.model], check=True)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path),
                          "unfused" if args.unfused else "fused"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    peak = r["peak_mib"] - r["before_mib"]
    print(f"{args.model} ({'unfused' if args.unfused else 'fused'}) on {cpu_name()}: model "
          f"{r['model_mib']:.0f} MiB; resident memory over the process before loading: peak "
          f"+{peak:.0f} MiB ({peak / r['model_mib']:.2f}x the model), after "
          f"+{r['after_mib'] - r['before_mib']:.0f} MiB, after malloc_trim "
          f"+{r['trimmed_mib'] - r['before_mib']:.0f} MiB; {r['seconds']:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build":
        build(Path(sys.argv[2]), fields_of(sys.argv[3]))
    else:
        main()
