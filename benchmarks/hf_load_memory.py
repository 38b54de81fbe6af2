"""Host memory while ``fusedmoe.hf.load_model`` loads a model, against the model's size.

Builds a random Qwen3-MoE model with transformers (sharded at 100 MB, as real
checkpoints are), then loads it in a fresh process and prints that process's
resident memory before, at its peak, and after (also after ``malloc_trim``,
which returns the heap that freed temporaries left behind)::

    python benchmarks/hf_load_memory.py [--dir /tmp/qwen3-moe-random] [--unfused]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import ctypes, gc, json, resource, sys
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
model = hf.load_model(sys.argv[1], fused_moe_mlp=sys.argv[2] == "fused")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
after = rss()
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
size = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) / 2**20
print(json.dumps(dict(model_mib=size, before_mib=before, peak_mib=peak, after_mib=after,
                      trimmed_mib=rss())))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/qwen3-moe-random")
    parser.add_argument("--unfused", action="store_true")
    args = parser.parse_args()
    path = Path(args.dir)
    if not (path / "config.json").is_file():
        import torch
        import transformers

        config = transformers.AutoConfig.for_model(
            "qwen3_moe", vocab_size=32000, hidden_size=512, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, moe_intermediate_size=256,
            num_experts=32, num_experts_per_tok=4, intermediate_size=1024,
            max_position_embeddings=1024)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(path, max_shard_size="100MB")
        del model
    out = subprocess.run([sys.executable, "-c", CHILD, str(path),
                          "unfused" if args.unfused else "fused"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(f"model {r['model_mib']:.0f} MiB; resident memory over the process before loading: "
          f"peak +{r['peak_mib'] - r['before_mib']:.0f} MiB, after "
          f"+{r['after_mib'] - r['before_mib']:.0f} MiB, after malloc_trim "
          f"+{r['trimmed_mib'] - r['before_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
