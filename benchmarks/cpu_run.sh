#!/usr/bin/env bash
# One prepared run on a CPU not measured before (above all an Intel Xeon with
# AMX, where the kernel's `amx` build has been tested only emulated): what the
# machine is, the kernel's tests on it, the AMX build against the AVX-512 BF16
# build side by side, the grouped matmul against the fastest dense GEMM, and
# the Qwen3 layer against transformers. Each step has its own time limit and
# writes into $OUT as it goes, so a step that runs long costs only itself.
#
#   make venv && OUT=out/cpu bash benchmarks/cpu_run.sh     # about 25 min
#
# Runs with .venv/bin/python (PYTHON to change it), made by `make venv`.
# GMM_ARGS / MOE_ARGS replace the benchmark shapes (a smoke run:
# GMM_ARGS=--quick MOE_ARGS="--preset tiny" AB_ARGS="--shape 512,256,512
# --rounds 1"); TEST_S, AB_S, GMM_S and MOE_S are the time limits in seconds,
# 0 skipping that step.
set -u
OUT=${OUT:-out/cpu}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1
KERNEL=src/fusedmoe/grouped_matmul/cpu_kernel.cc

# shellcheck source=benchmarks/steps.sh
. "$(dirname "$0")/steps.sh"

{
  date -u
  lscpu
  $PY -c "
from fusedmoe.grouped_matmul import available_backends, cpu_kernel
from fusedmoe.grouped_matmul.registry import auto_backend
print('backends:', available_backends())
print('cpu_kernel build:', cpu_kernel.build_name(), '| L2 bytes:', cpu_kernel.l2_bytes())
print('auto: f32', auto_backend('cpu', 'float32'), '| bf16', auto_backend('cpu', 'bfloat16'))"
} >"$OUT/env.txt" 2>&1

step tests "${TEST_S:-600}" $PY -m pytest -q -p no:cacheprovider tests/test_gmm_cpu_kernel.py \
  tests/test_gmm_contract.py tests/test_layer.py --junitxml "$OUT/tests.xml"

# The build this CPU gets against the same source without AMX (-U after the
# build's -D): on an AMX machine, the AMX tiles against AVX-512 BF16.
# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
step ab "${AB_S:-300}" $PY benchmarks/ab_cpu_kernel.py "$KERNEL:-UFUSEDMOE_AMX" "$KERNEL" \
  --dtype bfloat16 --groups 64 --rounds 7 ${AB_ARGS:-}

# shellcheck disable=SC2086
step gmm "${GMM_S:-600}" $PY -m fusedmoe bench-gmm ${GMM_ARGS:-} --groups 8,64 --dtype f32,bf16 \
  --backend cpu_kernel,tiled,auto --json "$OUT/gmm.json"

# shellcheck disable=SC2086
step moe "${MOE_S:-900}" $PY -m fusedmoe bench ${MOE_ARGS:---preset qwen3} --dtype f32,bf16 \
  --json "$OUT/moe.json"
