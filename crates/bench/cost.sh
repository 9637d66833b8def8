#!/usr/bin/env bash
# CPU per call, ledgerd's and the bench's, of a gRPC health check (the no-op of the ceiling)
# and of a one-transfer call (workload (b)), at the same concurrency against one ledgerd build.
# When the machine is saturated their ratio is the share of the ceiling that (b) can reach, and
# unlike that share it does not move with how fast the shared machine is that minute.
#
# Usage: crates/bench/cost.sh [LEDGERD] [CLIENTS]   (default target/release/ledgerd, 256)
set -euo pipefail
bin=${1:-target/release/ledgerd}
clients=${2:-256}
bench=${BENCH:-target/release/ledger-bench}
hz=$(getconf CLK_TCK)
for mode in health transfer; do
    port=$((20000 + RANDOM % 20000))
    dir=$(mktemp -d)
    "$bin" start --listen "127.0.0.1:$port" --shards 16 --data-dir "$dir/data" >"$dir/ledgerd.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    if [ "$mode" = health ]; then
        flags=(--count 0 --ceiling-secs 16) # 8 s before and 8 s after an empty run
    else
        flags=(--duration 8 --ceiling-secs 0)
    fi
    before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    ( TIMEFORMAT='%U %S'; time "$bench" --addr "http://127.0.0.1:$port" --clients "$clients" "${flags[@]}" ) \
        >"$dir/bench.out" 2>"$dir/bench.time"
    after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill -INT "$pid"
    wait "$pid" || true
    if [ "$mode" = health ]; then
        calls=$(grep -oE '[0-9]+ calls/s' "$dir/bench.out" | head -1 | awk '{print $1 * 16}')
    else
        calls=$(grep -oE 'transfers: [0-9]+' "$dir/bench.out" | head -1 | awk '{print $2}')
    fi
    awk -v m="$mode" -v n="$calls" -v l="$((after - before))" -v hz="$hz" \
        -v b="$(tail -1 "$dir/bench.time" | awk '{print $1 + $2}')" \
        'BEGIN { printf "%-8s %9d calls  ledgerd %6.1f us/call  bench %6.1f us/call  both %6.1f us/call\n", m, n, l / hz * 1e6 / n, b * 1e6 / n, l / hz * 1e6 / n + b * 1e6 / n }'
    rm -rf "$dir"
done
