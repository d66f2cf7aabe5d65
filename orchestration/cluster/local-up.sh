#!/usr/bin/env bash
# `make cluster-up`: a local Ray head with token authentication, dashboard (job API) on
# 127.0.0.1:8265, everything on loopback. The head runs `ray start --block` in its own
# process group; its pid goes to $RAY_LOCAL_STATE/head.pid so that local-down.sh stops
# this head only (never `ray stop`, which would stop every Ray on the machine).
# Settings (environment): RAY_DASHBOARD_PORT (8265), RAY_HEAD_PORT (6379),
# RAY_LOCAL_STATE (runs/cluster); extra arguments go to `ray start`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
HEAD_PORT=${RAY_HEAD_PORT:-6379}
METRICS_PORT=${RAY_METRICS_PORT:-8080}  # Prometheus scrapes http://127.0.0.1:$METRICS_PORT/metrics
STATE=${RAY_LOCAL_STATE:-$ROOT/runs/cluster}
PIDFILE=$STATE/head.pid
mkdir -p "$STATE"

if [[ -f $PIDFILE ]] && cat "/proc/$(cat "$PIDFILE")/cmdline" 2>/dev/null | tr "\0" " " | grep -q "ray start --head"; then
    echo "a local Ray head is already running (pid $(cat "$PIDFILE")); make cluster-down stops it"
    exit 0
fi

# The job's `python` must be the venv's: the head (and the job drivers it starts) get .venv/bin first.
export PATH=$ROOT/.venv/bin:$PATH
# A token in ~/.ray/auth_token (made once); the head and every client read it from there.
if ! ray get-auth-token >/dev/null 2>&1; then
    ray get-auth-token --generate >/dev/null
fi
export RAY_AUTH_MODE=token

setsid ray start --head --block --disable-usage-stats \
    --node-ip-address=127.0.0.1 --port="$HEAD_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --metrics-export-port="$METRICS_PORT" "$@" \
    >"$STATE/head.log" 2>&1 </dev/null &
echo $! >"$PIDFILE"

# Ready when the dashboard's job API answers (401 without the token is an answer too).
for _ in $(seq 1 120); do
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "error: the Ray head exited during start-up; see $STATE/head.log" >&2
        tail -n 20 "$STATE/head.log" >&2
        rm -f "$PIDFILE"
        exit 1
    fi
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$DASHBOARD_PORT/api/version" || true)
    if [[ $code =~ ^(200|401|403)$ ]]; then
        cat <<MSG
Ray head up (pid $(cat "$PIDFILE")): GCS 127.0.0.1:$HEAD_PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT, token auth on.
Prometheus metrics (ray_alexnet_* while a run trains): http://127.0.0.1:$METRICS_PORT/metrics
In the shell that submits jobs:
  export RAY_AUTH_MODE=token PATH=$ROOT/.venv/bin:\$PATH
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- python orchestration/train.py \\
      --config configs/demo.yaml --set shards_dir=\$PWD/data/shards --set storage_path=\$PWD/runs
Stop it with: make cluster-down
MSG
        exit 0
    fi
    sleep 1
done
echo "error: the Ray dashboard did not answer on 127.0.0.1:$DASHBOARD_PORT within 120 s; see $STATE/head.log" >&2
exit 1
