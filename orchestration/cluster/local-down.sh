#!/usr/bin/env bash
# `make cluster-down`: stop the head that local-up.sh started (its process group, by the
# pid it recorded), and only that one. RAY_STOP_GRACE_S (30): seconds before SIGKILL.
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE=${RAY_LOCAL_STATE:-$PWD/runs/cluster}
PIDFILE=$STATE/head.pid
if [[ ! -f $PIDFILE ]]; then
    echo "no local Ray head recorded in $PIDFILE (nothing to stop)"
    exit 0
fi
pid=$(cat "$PIDFILE")
if cat "/proc/$pid/cmdline" 2>/dev/null | tr "\0" " " | grep -q "ray start --head"; then  # ours, not a reused pid
    # `ray start --block` stops its GCS, raylet, dashboard and workers on SIGTERM (a few seconds)
    kill -TERM "$pid"
    for _ in $(seq 1 $((2 * ${RAY_STOP_GRACE_S:-30}))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    # whatever of its process group is still there (it did not stop within RAY_STOP_GRACE_S, default 30 s, or stragglers)
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "Ray head (pid $pid) stopped"
else
    echo "Ray head (pid $pid) was not running"
fi
rm -f "$PIDFILE"
