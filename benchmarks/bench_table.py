"""The docs' benchmark tables, as Markdown, from a benchmark's JSON file.

    python benchmarks/bench_table.py docs/bench/moe.json   # README, `fusedmoe bench`
    python benchmarks/bench_table.py docs/bench/gmm.json   # docs/backends.md, `bench-gmm`

For the layer (``fusedmoe bench --json``), one line per (preset, dtype,
backend, pass) where both layouts were measured:
unfused and fused time over the dense GEMMs of equal FLOPs (fused with its
paired ratio), the fused speed-up (unfused / fused, then paired), the peer's
time over dense, and peak memory fused / unfused. Rows the benchmark skipped
(a backend that does not run at that size) are left out, as in the README.

For the grouped matmul (``fusedmoe bench-gmm --json``), one line per measured
row: time and dense time in ms, and the ratios by medians, fastest runs and
rounds (paired).
"""

from __future__ import annotations

import argparse
import json
import sys

GMM_HEADER = (
    "| backend | mode | dtype | G | dist | ms | dense ms | ratio (median) | ratio (min) "
    "| paired |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)
_SHORT_DTYPES = {"float32": "f32", "bfloat16": "bf16"}

HEADER = (
    "| preset | dtype | backend | pass | unfused x dense | fused x dense (paired) "
    "| fused speed-up (paired) | transformers x dense | peak memory (fused / unfused) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _num(x, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.2f}{suffix}"


def table(rows: list[dict]) -> str:
    """The Markdown table of ``rows`` (the ``rows`` of a bench JSON file)."""
    measured = {}
    for row in rows:
        if row.get("median_s") is None:
            continue
        key = (row["preset"], row["dtype"], row["backend"], row["pass"])
        measured.setdefault(key, {})[row["layout"]] = row
    lines = [HEADER]
    for (preset, dtype, backend, pass_), layouts in measured.items():
        fused, unfused = layouts.get("fused"), layouts.get("unfused")
        if fused is None or unfused is None:
            continue
        lines.append(
            f"| {preset} | {dtype} | {backend} | {pass_} "
            f"| {_num(unfused['ratio_to_dense'])} "
            f"| {_num(fused['ratio_to_dense'])} ({_num(fused.get('ratio_to_dense_paired'))}) "
            f"| {_num(fused.get('fused_speedup'), 'x')} "
            f"({_num(fused.get('fused_speedup_paired'), 'x')}) "
            f"| {_num(fused.get('peer_ratio_to_dense'))} "
            f"| {_gib(fused.get('peak_bytes'))} / {_gib(unfused.get('peak_bytes'))} GiB |"
        )
    return "\n".join(lines)


def gmm_table(rows: list[dict]) -> str:
    """The Markdown table of a ``bench-gmm`` file's ``rows``."""
    lines = [GMM_HEADER]
    for row in rows:
        if row.get("median_s") is None:
            continue
        lines.append(
            f"| {row['backend']} | {row['mode']} "
            f"| {_SHORT_DTYPES.get(row['dtype'], row['dtype'])} | {row['groups']} | {row['dist']} "
            f"| {row['median_s'] * 1e3:.0f} | {row['dense_median_s'] * 1e3:.0f} "
            f"| {_num(row['ratio'], 'x')} | {_num(row.get('ratio_min'), 'x')} "
            f"| {_num(row.get('ratio_paired'), 'x')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path",
                        help="a file written by `fusedmoe bench --json` or `bench-gmm --json`")
    args = parser.parse_args(argv)
    try:
        with open(args.json_path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        parser.error(f"json_path: cannot read {args.json_path!r} as a bench JSON file ({e})")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        parser.error(f"json_path: {args.json_path!r} has no 'rows' list; expected the output "
                     "of `fusedmoe bench --json` or `fusedmoe bench-gmm --json`")
    if not data.get("complete", True):
        print("note: the run did not finish (complete: false)", file=sys.stderr)
    rows = data["rows"]
    print(gmm_table(rows) if any("mode" in row for row in rows) else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
