#!/usr/bin/env bash
# One device call: GPU tests, then benchmarks; logs and JSON go to $OUT (default ./gpu_out).
# Usage: PUNICA_COMMIT=$(git rev-parse HEAD) [STEPS="tests lora_op slices decode textgen row_probe profile serve cluster"] \
#        [TESTS="tests/ops -k row"] [TEXTGEN_ARGS="--num-requests 200"] bash scripts/gpu_check.sh
# Extra arguments go to the lora_op benchmark (e.g. --sweep).
# Steps serve and cluster need the wheels of scripts/device_wheels.sh carried (.whl; cluster also
# .rayw1 and .rayw2, over two calls: see that script). SERVE_ARGS / CLUSTER_ARGS go to the server,
# SERVE_MODEL (default random:llama2-7b), SERVE_RATE, SERVE_REQUESTS, SERVE_BENCH_ARGS to the run.
set -uo pipefail
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-tests lora_op decode}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rc=0

server_deps() {  # fastapi, uvicorn, pydantic, openai: from the carried .whl
  python3 -c 'import fastapi, uvicorn, pydantic' 2>/dev/null && return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
}

ray_deps() {  # Ray's wheel in two carried halves, plus jsonschema
  python3 -c 'import ray' 2>/dev/null && return 0
  local whl=/tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
  cat .rayw1/ray.part-* .rayw2/ray.part-* > "$whl" || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$whl" .rayw2/*.whl || return 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
}

# bench_server NAME PORT SUBCOMMAND ARGS...: start `punica SUBCOMMAND` on the 7B-shape random
# model, wait for /health, run `punica bench serve` against it (Skewed), save its status, stop it.
bench_server() {
  local name=$1 port=$2; shift 2
  python3 -m punica.cli "$@" --model ${SERVE_MODEL:-random:llama2-7b} --random-adapters 100 --port "$port" \
    > "$OUT/${name}_server.log" 2>&1 &
  local pid=$! url="http://127.0.0.1:$port"
  python3 - "$url" <<'PY' || { kill $pid; return 1; }
import sys, time, httpx
for _ in range(600):
    try:
        if httpx.get(sys.argv[1] + "/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(1)
sys.exit("the server did not come up in 600 s")
PY
  mkdir -p "$OUT/$name"
  python3 - "$url/cluster/status" "$OUT/$name/status_trace.jsonl" <<'PY' &
import json, sys, time, httpx  # the cluster's load each second (404 on `punica serve`: stop)
with open(sys.argv[2], "w") as f:
    while True:
        r = httpx.get(sys.argv[1], timeout=10)
        if r.status_code != 200:
            break
        f.write(json.dumps({"t": time.time(), **r.json()}) + "\n")
        f.flush()
        time.sleep(1)
PY
  local poller=$!
  python3 -m punica.cli bench serve --url "$url" --mix skewed --rate ${SERVE_RATE:-2} \
    --num-requests ${SERVE_REQUESTS:-120} --out-dir "$OUT/$name" ${SERVE_BENCH_ARGS:-}
  local status=$?
  python3 -c "import httpx, sys; print(httpx.get(sys.argv[1], timeout=10).text)" \
    "$url/cluster/status" > "$OUT/$name/cluster_status.json" 2>/dev/null
  python3 -c "import httpx, sys; print(httpx.get(sys.argv[1], timeout=10).text)" \
    "$url/metrics" > "$OUT/$name/metrics.txt" 2>/dev/null
  kill $poller $pid 2>/dev/null; wait $poller $pid 2>/dev/null
  return $status
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.log"

for step in $STEPS; do
  case $step in
    tests) python3 -m pytest -q -p no:warnings -p no:cacheprovider ${TESTS:-tests} 2>&1 \
             | tee "$OUT/tests.log" | tail -40 | tee "$OUT/tests_tail.log" ;;
    row_probe) python3 scripts/row_probe.py "$OUT" 2>&1 | tee "$OUT/row_probe.log" ;;
    profile) python3 scripts/step_profile.py "$OUT" 2>&1 | grep -v '^USDT' \
               | tee "$OUT/step_profile.log" ;;
    lora_op) python3 -m punica.bench.lora_op --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/lora_op.log" ;;
    slices) python3 -m punica.bench.lora_slices --out-dir "$OUT" 2>&1 | tee "$OUT/lora_slices.log" ;;
    decode) python3 -m punica.bench.decode --out-dir "$OUT" 2>&1 | tee "$OUT/decode.log" ;;
    serve) { server_deps && bench_server serve 8011 serve ${SERVE_ARGS:-}; } 2>&1 \
             | tee "$OUT/serve.log" ;;
    cluster) { server_deps && ray_deps && bench_server cluster 8012 cluster \
                 ${CLUSTER_ARGS:---num-engines 2 --gpus-per-engine 0.5 --max-num-seqs 32}; } 2>&1 \
               | tee "$OUT/cluster.log" ;;
    textgen) python3 -m punica.bench.textgen --out-dir "$OUT" ${TEXTGEN_ARGS:-} 2>&1 \
               | tee "$OUT/textgen.log" ;;
    *) echo "gpu_check: unknown step $step"; rc=1; continue ;;
  esac
  status=${PIPESTATUS[0]}
  echo "gpu_check: $step rc=$status"
  [ "$status" -eq 0 ] || rc=1
done
exit $rc
