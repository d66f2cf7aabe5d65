#!/usr/bin/env bash
# `make cluster-down`: stop the head that local-up.sh started (its process group, by the
# pid it recorded), and only that one.
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE=${RAY_LOCAL_STATE:-$PWD/runs/cluster}
PIDFILE=$STATE/head.pid
if [[ ! -f $PIDFILE ]]; then
    echo "no local Ray head recorded in $PIDFILE (nothing to stop)"
    exit 0
fi
pid=$(cat "$PIDFILE")
if kill -0 "$pid" 2>/dev/null; then
    # `ray start --block` stops its GCS, raylet and dashboard on SIGTERM; the group signal
    # reaches any of them that would otherwise linger.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "Ray head (pid $pid) stopped"
else
    echo "Ray head (pid $pid) was not running"
fi
rm -f "$PIDFILE"
