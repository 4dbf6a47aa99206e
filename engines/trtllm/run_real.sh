#!/usr/bin/env bash
# Run a real TensorRT-LLM worker behind a kvrouter router and show the router
# learning its KV cache. Needs an NVIDIA GPU, tensorrt_llm (pip install
# 'kvrouter[trtllm]' or NVIDIA's TensorRT-LLM container), a Redis server and a
# model directory. Step by step explanation: engines/trtllm/README.md.
#
#   MODEL=/models/TinyLlama-1.1B-Chat-v1.0 engines/trtllm/run_real.sh
#
# Environment (defaults in brackets):
#   MODEL            HF model directory (required)
#   SERVED [tiny]    model name in the router
#   REDIS_URL [redis://127.0.0.1:6379/0]
#   BLOCK [32]       tokens per KV block (engine) = router block size here
#   ROUTER [127.0.0.1:50051]   router gRPC address
#   ENGINE [127.0.0.1:50061]   worker gRPC address
set -euo pipefail

: "${MODEL:?set MODEL to a model directory}"
SERVED=${SERVED:-tiny}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
BLOCK=${BLOCK:-32}
ROUTER=${ROUTER:-127.0.0.1:50051}
ENGINE=${ENGINE:-127.0.0.1:50061}
LOGS=${LOGS:-$(mktemp -d)}

command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: this needs an NVIDIA GPU" >&2; exit 3; }
python -c "import tensorrt_llm" 2>/dev/null || {
  echo "tensorrt_llm is not importable: pip install 'kvrouter[trtllm]'" >&2; exit 3; }
python -c "import redis, sys; redis.Redis.from_url(sys.argv[1]).ping()" "$REDIS_URL" || {
  echo "Redis at $REDIS_URL does not answer" >&2; exit 3; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT

echo "1. router (logs in $LOGS)"
python -m kvrouter.cli serve --listen "$ROUTER" --redis-url "$REDIS_URL" --metrics-port 0 \
  --model "$SERVED,block_size=$BLOCK" >"$LOGS/router.log" 2>&1 &
pids+=($!)

echo "2. TensorRT-LLM worker (building the engine takes a while)"
python -m kvrouter.cli engine trtllm --model "$MODEL" --served-model "$SERVED" \
  --worker-id trt-0 --listen "$ENGINE" --redis "$REDIS_URL" --tokens-per-block "$BLOCK" \
  --log-level INFO >"$LOGS/worker.log" 2>&1 &
pids+=($!)

echo "3. waiting for the worker to register with the router"
for _ in $(seq 1 600); do
  if python -m kvrouter.cli workers --target "$ROUTER" --model "$SERVED" 2>/dev/null \
      | grep -q trt-0; then break; fi
  kill -0 "${pids[1]}" 2>/dev/null || { echo "worker exited:" >&2; tail -50 "$LOGS/worker.log" >&2; exit 1; }
  sleep 1
done
python -m kvrouter.cli workers --target "$ROUTER" --model "$SERVED"

echo "4. one request through the worker's Engine API (a 300-token prompt, 8 tokens out)"
python - "$ENGINE" <<'EOF'
import random, sys
import grpc
from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(sys.argv[1]))
prompt = [random.Random(0).randrange(100, 30000) for _ in range(300)]
out = [t for r in stub.Generate(engine_pb2.GenerateRequest(
    request_id="demo-1", token_ids=prompt, sampling=common_pb2.SamplingParams(max_tokens=8)))
    for t in r.token_ids]
print("generated", out)
open("/tmp/kvrouter-trtllm-prompt.txt", "w").write(" ".join(map(str, prompt)))
EOF

echo "5. the router's view: the same prompt now overlaps on trt-0"
sleep 1
python -m kvrouter.cli route --target "$ROUTER" --model "$SERVED" \
  --tokens-file /tmp/kvrouter-trtllm-prompt.txt
python -m kvrouter.cli workers --target "$ROUTER" --model "$SERVED"

echo "6. engine stats"
python - "$ENGINE" <<'EOF'
import sys
import grpc
from kvrouter._proto.v1 import engine_pb2, engine_pb2_grpc
print(engine_pb2_grpc.EngineStub(grpc.insecure_channel(sys.argv[1])).Stats(engine_pb2.StatsRequest()))
EOF
echo "done; logs in $LOGS"
