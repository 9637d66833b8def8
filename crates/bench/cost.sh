#!/usr/bin/env bash
# CPU per call, ledgerd's and the bench's, of a gRPC health check (the no-op of the ceiling)
# and of a one-transfer call (workload (b)), at the same concurrency against one ledgerd build.
# When the machine is saturated their ratio is the share of the ceiling that (b) can reach, and
# unlike that share it does not move with how fast the shared machine is that minute.
#
# Usage: crates/bench/cost.sh [LEDGERD] [CLIENTS] [LEDGERD FLAGS...]
#        (default target/release/ledgerd, 256; flags such as `--store memory` go to ledgerd)
set -euo pipefail
# shellcheck source=measure.sh
. "$(dirname "$0")/measure.sh"
bin=${1:-target/release/ledgerd}
clients=${2:-256}
shift $(($# < 2 ? $# : 2))
for mode in health transfer; do
    dir=$(mktemp -d)
    ledgerd_start "$bin" "$dir" "$@"
    before=$(cpu_seconds "$PID")
    if [ "$mode" = health ]; then
        # 8 s before and 8 s after an empty run: calls = mean rate x 16 s.
        bench_cpu=$(bench_timed "$dir" --clients "$clients" --count 0 --ceiling-secs 16)
        calls=$(grep -oE '[0-9]+ calls/s' "$dir/bench.out" | head -1 | awk '{print $1 * 16}')
    else
        bench_cpu=$(bench_timed "$dir" --clients "$clients" --duration 8 --ceiling-secs 0)
        calls=$(grep -oE 'transfers: [0-9]+' "$dir/bench.out" | head -1 | awk '{print $2}')
    fi
    after=$(cpu_seconds "$PID")
    ledgerd_stop
    awk -v m="$mode" -v n="$calls" -v l="$before" -v L="$after" -v b="$bench_cpu" \
        'BEGIN { d = (L - l) * 1e6 / n; c = b * 1e6 / n; printf "%-8s %9d calls  ledgerd %6.1f us/call  bench %6.1f us/call  both %6.1f us/call\n", m, n, d, c, d + c }'
    rm -rf "$dir"
done
