"""Training-step throughput, fused vs unfused, side by side in one process.

``fusedmoe train --compare [--preset P] [--steps S] [--out DIR]`` (or
``python -m fusedmoe.bench.train_bench``) trains the fused and the unfused
model of one preset from the same initial numbers on the same batches,
alternating one step of each (and which goes first), and reports the median
tokens/s of each and their ratio. Both loss curves go into one PNG, so the
run also shows that the two layouts learn the same thing.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fusedmoe.train.config import TrainConfig


def compare(config: TrainConfig, steps: int | None = None, out: str | None = None, *,
            warmup: int = 3, verbose: bool = True) -> dict[str, Any]:
    """Run ``steps`` (default ``config.steps``) training steps of the fused and the
    unfused model, interleaved. Returns a dict with ``tokens_per_s`` (per layout,
    median over the steps after ``warmup``), ``ratio`` (fused / unfused) and the
    ``losses`` of each."""
    import jax

    from fusedmoe.atomic import write_json
    from fusedmoe.checkpoint.run_checkpoint import convert_run_state
    from fusedmoe.corpus import batch_at
    from fusedmoe.train.plot import plot_losses
    from fusedmoe.train.trainer import learning_rates, trainer_for

    steps = steps or config.steps
    if steps <= warmup:
        raise ValueError(f"steps: need more than warmup={warmup} steps to time, got {steps}")
    configs = {"fused": config.with_layout(fused=True),
               "unfused": config.with_layout(fused=False)}
    trainers = {k: trainer_for(c) for k, c in configs.items()}
    start = trainers["fused"].init_state(config.seed)
    states = {"fused": start, "unfused": convert_run_state(start, fused=False)}
    # A timing run shorter than the preset takes the first rates of the preset's
    # schedule, not a schedule squeezed into its few steps.
    lrs = learning_rates(config.replace(steps=max(steps, config.steps)))
    times: dict[str, list[float]] = {k: [] for k in configs}
    losses: dict[str, list[float]] = {k: [] for k in configs}
    order = list(configs)
    for step in range(1, steps + 1):
        inputs, targets = batch_at(config.seed, step, config.batch_size, config.seq_len)
        for name in order:
            s = states[name]
            t0 = time.perf_counter()
            params, opt_state, m = trainers[name].step(
                s["params"], s["opt_state"], inputs, targets, lrs[step - 1])
            loss = float(jax.block_until_ready(m["loss"]))
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss)
            states[name] = {"params": params, "opt_state": opt_state}
        order.reverse()
        if verbose and (step % max(1, steps // 10) == 0 or step == steps):
            print(f"step {step:4d}  loss fused {losses['fused'][-1]:.4f}  "
                  f"unfused {losses['unfused'][-1]:.4f}")
    tps = {k: config.tokens_per_step / float(np.median(v[warmup:])) for k, v in times.items()}
    result = {
        "preset": config.preset_name,
        "backend": config.model.moe.gmm_backend,
        "platform": jax.default_backend(),
        "steps": steps,
        "tokens_per_step": config.tokens_per_step,
        "tokens_per_s": tps,
        "ratio": tps["fused"] / tps["unfused"],
        "max_rel_loss_diff": float(np.max(np.abs(np.subtract(losses["fused"], losses["unfused"]))
                                          / np.abs(losses["unfused"]))),
        "losses": losses,
    }
    if out is not None:
        os.makedirs(out, exist_ok=True)
        x = list(range(1, steps + 1))
        plot_losses({k: (x, v) for k, v in losses.items()},
                    os.path.join(out, "compare_loss.png"),
                    title=f"{config.preset_name}: fused vs unfused")
        write_json(os.path.join(out, "compare.json"), result)
    if verbose:
        print(f"{config.preset_name} preset, backend {result['backend']} on "
              f"{result['platform']}, {config.tokens_per_step} tokens/step, median of "
              f"{steps - warmup} steps:")
        print(f"  fused   {tps['fused']:12,.0f} tokens/s")
        print(f"  unfused {tps['unfused']:12,.0f} tokens/s")
        print(f"  fused / unfused = {result['ratio']:.3f}x   (max relative loss difference "
              f"{result['max_rel_loss_diff']:.2e})")
    return result


def main(argv: list[str] | None = None) -> int:
    from fusedmoe.train.config import DEFAULT_PRESET, TrainConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=DEFAULT_PRESET)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    config = TrainConfig.preset(args.preset).with_layout(backend=args.backend)
    compare(config, args.steps, args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
