#!/usr/bin/env bash
# Starts a throwaway redis-server on 127.0.0.1:${REDIS_PORT:-6379} unless one answers already.
# Only the tests and `--redis` modes need Redis; the main job (kvrouter demo) does not.
set -euo pipefail
PORT=${REDIS_PORT:-6379}
if redis-cli -p "$PORT" ping >/dev/null 2>&1; then
  exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "ensure_redis: installing redis-server" >&2
  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
fi
redis-server --daemonize yes --bind 127.0.0.1 --port "$PORT" --save "" --appendonly no \
  --logfile /tmp/kvrouter-redis-"$PORT".log
for _ in $(seq 50); do
  redis-cli -p "$PORT" ping >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "ensure_redis: redis-server did not answer on port $PORT" >&2
exit 1
