#!/usr/bin/env bash
# One prepared run on a GPU machine: the grouped-matmul and layer tests on the
# GPU, then bench-gmm and the layer benchmark at GPU-sized shapes. Each step has
# its own time limit and writes into $OUT as it goes, so a step that runs long
# costs only itself.
#
#   OUT=out/gpu bash benchmarks/gpu_run.sh
#
# Needs a python3 with jax's GPU plugin, flax, optax, orbax, rich, matplotlib,
# pytest, pytest-timeout and hypothesis. The package runs from src/ without
# installing. tokamax is optional; carry the release made for the machine's jax
# as wheels. What worked for jax 0.11.2 on Python 3.12 (2026-11-27, 5.7 MiB):
# tokamax 0.0.17, einshape 1.0, pydantic 2.14.4, pydantic_core 2.50.5 (cp312),
# annotated_types 0.8.0, typing_inspection 0.4.5, typing_extensions 4.16.0,
# qwix 0.1.8, immutabledict 4.3.1, tensorboardx 2.6.5, and NOT the real xprof
# (32 MB, with duckdb, google-cloud-storage, ...) but a 2 KB stub wheel holding
# only xprof.cli.tools.get_kernel_stats_tool, which tokamax imports at import
# time; build it with `python3 benchmarks/make_xprof_stub.py .whl`. Install them
# with `python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl`
# and put /tmp/site on PYTHONPATH. tokamax 0.0.12, the Python 3.11 release,
# imports there and fails inside its kernels.
#
# Do not export XLA_PYTHON_CLIENT_PREALLOCATE: the tests step turns JAX's
# preallocation off for itself (so PYTEST_ADDOPTS="-n 6" can run 6 workers on
# one GPU), and the benchmarks run with JAX's default preallocation (with it
# off, bench-gmm's ragged_dot bf16 G=64 forward+backward ran out of memory on
# 2026-11-27, a case that had run with it on 2026-11-26).
#
# GMM_ARGS / MOE_ARGS replace the benchmark shapes (a CPU smoke run of this
# script: GMM_ARGS=--quick MOE_ARGS="--preset tiny"); GMM_BACKENDS (comma list)
# and MOE_BACKENDS (space list) the backends; TEST_S, GMM_S and MOE_S the time
# limits in seconds, 0 skipping that step.
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# shellcheck source=benchmarks/steps.sh
. "$(dirname "$0")/steps.sh"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  $PY -c "from fusedmoe.grouped_matmul import available_backends as a; from fusedmoe.grouped_matmul.registry import auto_backend as b; print(a()); print('auto: f32', b(dtype='float32'), 'bf16', b(dtype='bfloat16'))"
} >"$OUT/env.txt" 2>&1

step tests "${TEST_S:-210}" env XLA_PYTHON_CLIENT_PREALLOCATE=false $PY -m pytest -q -p no:cacheprovider --timeout 90 \
  --junitxml "$OUT/tests.xml" tests/test_gmm.py tests/test_layer.py

# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
step gmm "${GMM_S:-170}" env -u XLA_PYTHON_CLIENT_PREALLOCATE $PY -m fusedmoe bench-gmm ${GMM_ARGS:---m 16384 --k 2048 --n 4096} \
  --groups 8,64 --dtype bf16,f32 --backend "${GMM_BACKENDS:-tiled,ragged_dot,tokamax}" \
  --dense-expansion-max-groups 64 --repeats 15 --json "$OUT/gmm.json"

# shellcheck disable=SC2086
step moe "${MOE_S:-170}" env -u XLA_PYTHON_CLIENT_PREALLOCATE $PY -m fusedmoe bench ${MOE_ARGS:---preset qwen3 --tokens 8192} \
  $(printf -- '--backend %s ' ${MOE_BACKENDS:-tokamax tiled ragged_dot}) \
  --dtype bfloat16 --dtype float32 \
  --repeats 10 --no-peer --json "$OUT/moe.json" --plot "$OUT/moe.png"
