#!/usr/bin/env bash
# One device call: GPU tests, then benchmarks; logs and JSON go to $OUT (default ./gpu_out).
# Pass PUNICA_COMMIT as a literal hash taken here: `git rev-parse` on the device reads its copy's
# .git, whose HEAD is not the tree that runs (two JSONs of 1ba5335 were labelled 70356de).
# Usage: PUNICA_COMMIT=$(git rev-parse HEAD) [STEPS="tests lora_op slices decode textgen adapters adapter_latency fairness convoy \
#        row_probe decode_split profile textgen_profile serve cluster mg_scale1 mg_scale2 mg_ramp mg_migrate"] [TESTS="tests/ops -k row"] \
#        [TEXTGEN_ARGS="--num-requests 200"] bash scripts/gpu_check.sh
# Extra arguments go to the lora_op benchmark (e.g. --sweep).
# The script packs $OUT into $OUT/gpu_out.tgz itself (PACK=0: leave the files): a device call must
# not archive $OUT again after it (an archive written inside $OUT overwrote this one, empty).
# Steps serve, cluster and mg_* need the wheels of scripts/device_wheels.sh carried (.whl; cluster
# and mg_* also .rayslim); mg_* need two GPUs (see multigpu() below). SERVE_ARGS / CLUSTER_ARGS
# go to the server, SERVE_MODEL (default random:llama2-7b), SERVE_RATE, SERVE_REQUESTS,
# SERVE_BENCH_ARGS to the run.
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

ray_deps() {  # Ray, slimmed and packed by scripts/device_wheels.sh, plus jsonschema
  if ! python3 -c 'import ray' 2>/dev/null; then
    mkdir -p /tmp/site
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
      .rayslim/ray-slim.tar.xz /tmp/site || return 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .rayslim/*.whl || return 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  # Ray's own servers must be executable (the wheel is a zip, which keeps no modes)
  chmod -R u+x "$(python3 -c 'import os, ray; print(os.path.dirname(ray.__file__))')/core/src"
  python3 -c 'import ray; print("ray", ray.__version__)'
}

# start_server NAME PORT SUBCOMMAND ARGS...: `punica SUBCOMMAND` on the 7B-shape random model (100
# random adapters) in the background, logging to $OUT/NAME_server.log; waits for /health and sets
# SERVER_PID and SERVER_URL.
start_server() {
  local name=$1 port=$2; shift 2
  python3 -m punica.cli "$@" --model ${SERVE_MODEL:-random:llama2-7b} --random-adapters 100 \
    --port "$port" > "$OUT/${name}_server.log" 2>&1 &
  SERVER_PID=$! SERVER_URL="http://127.0.0.1:$port"
  python3 - "$SERVER_URL" "$SERVER_PID" <<'PY' || { kill $SERVER_PID; return 1; }
import os, sys, time, httpx
start = time.time()
while time.time() - start < 600:
    try:
        if httpx.get(sys.argv[1] + "/health", timeout=2).status_code == 200:
            print(f"server up in {time.time() - start:.0f} s", flush=True)
            sys.exit(0)
    except httpx.HTTPError:
        pass
    try:
        os.kill(int(sys.argv[2]), 0)
    except OSError:
        sys.exit("the server exited before it came up")
    time.sleep(1)
sys.exit("the server did not come up in 600 s")
PY
}

stop_server() {
  kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null
}

# bench_run DIR ARGS...: `punica bench serve ARGS` against SERVER_URL into $OUT/DIR, with the
# cluster's status each second (status_trace.jsonl; nothing on `punica serve`), its last status
# and the metrics.
bench_run() {
  local dir="$OUT/$1"; shift
  mkdir -p "$dir"
  python3 - "$SERVER_URL/cluster/status" "$dir/status_trace.jsonl" <<'PY' &
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
  python3 -m punica.cli bench serve --url "$SERVER_URL" --out-dir "$dir" "$@"
  local status=$?
  python3 -c "import httpx, sys; print(httpx.get(sys.argv[1], timeout=10).text)" \
    "$SERVER_URL/cluster/status" > "$dir/cluster_status.json" 2>/dev/null
  python3 -c "import httpx, sys; print(httpx.get(sys.argv[1], timeout=10).text)" \
    "$SERVER_URL/metrics" > "$dir/metrics.txt" 2>/dev/null
  kill $poller 2>/dev/null; wait $poller 2>/dev/null
  return $status
}

# bench_server NAME PORT SUBCOMMAND ARGS...: one server, one Skewed run of bench serve into $OUT/NAME.
bench_server() {
  local name=$1 port=$2; shift 2
  start_server "$name" "$port" "$@" || return 1
  bench_run "$name" --mix skewed --rate ${SERVE_RATE:-2} --num-requests ${SERVE_REQUESTS:-120} \
    ${SERVE_BENCH_ARGS:-}
  local status=$?
  stop_server
  return $status
}

# multigpu PART: one engine per GPU (issue 7), the runs under $OUT/multigpu/ that
# `python -m punica.cluster.replay` compares with the simulator:
#   scale1   1 engine: Skewed and Distinct, MG_REQUESTS (64) requests at once
#   scale2   2 engines: the same with twice the requests
#   ramp     2 engines: Skewed, MG_RAMP_REQUESTS (240) arrivals rising at MG_RAMP (0.5:8) req/s
#   migrate  2 engines of MG_KV_BLOCKS (800) KV blocks each: Skewed at MG_MIGRATE_RATE (3) req/s
# MG_ENGINE_ARGS replace the engines' flags (default: 1 GPU each, batch cap 32 and as many adapter
# slots, so a Distinct batch is not capped at the serve default of 8 slots), MG_BENCH_ARGS
# go to every run.
multigpu() {
  local n=${MG_REQUESTS:-64} failed=0
  local engines=(cluster ${MG_ENGINE_ARGS:---gpus-per-engine 1 --max-num-seqs 32 --max-loras 32 \
                                          --max-lora-rank 16})
  local extra=(${MG_BENCH_ARGS:-})  # e.g. --maxlen 64 --vocab 200 for a tiny model
  case $1 in
    scale1|scale2)
      local k=${1#scale}
      start_server "mg_$1" 8013 "${engines[@]}" --num-engines "$k" || return 1
      for mix in skewed distinct; do
        bench_run "multigpu/$1_$mix" --mix "$mix" --rate 0 --num-requests $((k * n)) \
          "${extra[@]}" || failed=1
      done ;;
    ramp)
      start_server mg_ramp 8014 "${engines[@]}" --num-engines 2 || return 1
      bench_run multigpu/ramp --mix skewed --rate-ramp "${MG_RAMP:-0.5:8}" \
        --num-requests ${MG_RAMP_REQUESTS:-240} "${extra[@]}" || failed=1 ;;
    migrate)
      start_server mg_migrate 8015 "${engines[@]}" --num-engines 2 \
        --num-kv-blocks ${MG_KV_BLOCKS:-800} || return 1
      bench_run multigpu/migrate --mix skewed --rate ${MG_MIGRATE_RATE:-3} \
        --num-requests ${MG_MIGRATE_REQUESTS:-90} "${extra[@]}" || failed=1 ;;
    *) echo "multigpu: unknown part $1"; return 1 ;;
  esac
  stop_server
  return $failed
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.log"

for step in $STEPS; do
  case $step in
    tests) { [ -d .whl ] && server_deps; [ -d .rayslim ] && ray_deps; } >/dev/null 2>&1
           python3 -m pytest -q -p no:warnings -p no:cacheprovider ${TESTS:-tests} 2>&1 \
             | tee "$OUT/tests.log" | tail -40 | tee "$OUT/tests_tail.log" ;;
    row_probe) python3 scripts/row_probe.py "$OUT" 2>&1 | tee "$OUT/row_probe.log" ;;
    decode_split) python3 scripts/decode_split_probe.py "$OUT" 2>&1 \
                    | tee "$OUT/decode_split_probe.log" ;;
    profile) python3 scripts/step_profile.py "$OUT" 2>&1 | grep -v '^USDT' \
               | tee "$OUT/step_profile.log" ;;
    textgen_profile) python3 scripts/textgen_profile.py "$OUT" ${TEXTGEN_PROFILE_ARGS:-} 2>&1 \
                       | grep -v '^USDT' | tee "$OUT/textgen_profile.log" ;;
    lora_op) python3 -m punica.bench.lora_op --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/lora_op.log" ;;
    slices) python3 -m punica.bench.lora_slices --out-dir "$OUT" 2>&1 | tee "$OUT/lora_slices.log" ;;
    decode) python3 -m punica.bench.decode --out-dir "$OUT" 2>&1 | tee "$OUT/decode.log" ;;
    serve) { server_deps && bench_server serve 8011 serve ${SERVE_ARGS:-}; } 2>&1 \
             | tee "$OUT/serve.log" ;;
    cluster) { server_deps && ray_deps && bench_server cluster 8012 cluster \
                 ${CLUSTER_ARGS:---num-engines 2 --gpus-per-engine 0.5 --max-num-seqs 32}; } 2>&1 \
               | tee "$OUT/cluster.log" ;;
    mg_scale1|mg_scale2|mg_ramp|mg_migrate)
      { server_deps && ray_deps && multigpu "${step#mg_}"; } 2>&1 | tee -a "$OUT/multigpu.log" ;;
    textgen) python3 -m punica.bench.textgen --out-dir "$OUT" ${TEXTGEN_ARGS:-} 2>&1 \
               | tee "$OUT/textgen.log" ;;
    adapters) python3 -m punica.bench.adapters --out-dir "$OUT" --root /tmp/adapter_root \
                ${ADAPTERS_ARGS:-} 2>&1 | tee "$OUT/adapters.log" ;;
    fairness) python3 -m punica.bench.fairness --out-dir "$OUT" ${FAIRNESS_ARGS:-} 2>&1 \
                | tee "$OUT/fairness.log" ;;
    convoy) python3 scripts/convoy_probe.py "$OUT" 2>&1 | tee "$OUT/convoy_probe.log" ;;
    adapter_latency) python3 -m punica.bench.adapter_latency --out-dir "$OUT" \
                       --root /tmp/adapter_latency_root ${ADAPTER_LATENCY_ARGS:-} 2>&1 \
                       | tee "$OUT/adapter_latency.log" ;;
    *) echo "gpu_check: unknown step $step"; rc=1; continue ;;
  esac
  status=${PIPESTATUS[0]}
  echo "gpu_check: $step rc=$status"
  [ "$status" -eq 0 ] || rc=1
done
if [ "${PACK:-1}" = 1 ]; then  # a call brings back only a few files: one archive of them all
  tar -C "$OUT" -czf /tmp/gpu_out.tgz . && find "$OUT" -mindepth 1 -delete \
    && mv /tmp/gpu_out.tgz "$OUT/gpu_out.tgz"
fi
exit $rc
