#!/usr/bin/env bash
# One device call: GPU tests, then benchmarks; logs and JSON go to $OUT (default ./gpu_out).
# Usage: PUNICA_COMMIT=$(git rev-parse HEAD) [STEPS="tests lora_op decode textgen row_probe profile"] \
#        [TESTS="tests/ops -k row"] [TEXTGEN_ARGS="--num-requests 200"] bash scripts/gpu_check.sh
# Extra arguments go to the lora_op benchmark (e.g. --sweep).
set -uo pipefail
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-tests lora_op decode}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rc=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.log"

for step in $STEPS; do
  case $step in
    tests) python3 -m pytest -q -p no:warnings -p no:cacheprovider ${TESTS:-tests} 2>&1 \
             | tee "$OUT/tests.log" ;;
    row_probe) python3 scripts/row_probe.py "$OUT" 2>&1 | tee "$OUT/row_probe.log" ;;
    profile) python3 scripts/step_profile.py "$OUT" 2>&1 | grep -v '^USDT' \
               | tee "$OUT/step_profile.log" ;;
    lora_op) python3 -m punica.bench.lora_op --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/lora_op.log" ;;
    decode) python3 -m punica.bench.decode --out-dir "$OUT" 2>&1 | tee "$OUT/decode.log" ;;
    textgen) python3 -m punica.bench.textgen --out-dir "$OUT" ${TEXTGEN_ARGS:-} 2>&1 \
               | tee "$OUT/textgen.log" ;;
    *) echo "gpu_check: unknown step $step"; rc=1; continue ;;
  esac
  status=${PIPESTATUS[0]}
  echo "gpu_check: $step rc=$status"
  [ "$status" -eq 0 ] || rc=1
done
exit $rc
