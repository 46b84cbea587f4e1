#!/usr/bin/env bash
# One device call: GPU tests, then benchmarks; logs and JSON go to $OUT (default ./gpu_out).
# Usage: PUNICA_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_check.sh [--sweep] [--quick]
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BENCH_ARGS=("$@")

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.log"

python3 -m pytest -q -p no:warnings -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

python3 -m punica.bench.lora_op --out-dir "$OUT" "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
