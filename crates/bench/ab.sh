#!/usr/bin/env bash
# Compares two ledgerd builds by alternating runs: each run starts the build on a fresh data
# directory (16 shards), drives it with ledger-bench, and prints transfers/s, p99, and the CPU
# time per transfer of ledgerd (user + system, from /proc), of the bench (from `time`), and of
# the whole machine (from /proc/stat: both, the kernel's own threads, and anything else
# running; setting up the accounts included).
# CPU per transfer is steadier than the rate on a shared machine, and the bench's own CPU per
# transfer (the same work in both builds) shows how fast the machine was at that moment.
#
# Usage: crates/bench/ab.sh ROUNDS LEDGERD_A LEDGERD_B [ledger-bench flags...]
#   e.g. crates/bench/ab.sh 3 /tmp/ledgerd.before target/release/ledgerd --clients 256 --duration 20
# Env: BENCH (default target/release/ledger-bench), LEDGERD_ARGS (extra `ledgerd start` flags).
set -euo pipefail
# shellcheck source=measure.sh
. "$(dirname "$0")/measure.sh"
rounds=$1 a=$2 b=$3
shift 3
one() {
    local bin=$1 dir before after bench_cpu busy_before busy_after
    shift
    dir=$(mktemp -d)
    # shellcheck disable=SC2086
    ledgerd_start "$bin" "$dir" ${LEDGERD_ARGS:-}
    before=$(cpu_seconds "$PID")
    busy_before=$(machine_busy_seconds)
    bench_cpu=$(bench_timed "$dir" --ceiling-secs 0 "$@")
    busy_after=$(machine_busy_seconds)
    after=$(cpu_seconds "$PID")
    ledgerd_stop
    awk -v n="$(grep -oE 'transfers: [0-9]+' "$dir/bench.out" | head -1 | awk '{print $2}')" \
        -v r="$(grep -oE '= [0-9]+ transfers/s' "$dir/bench.out" | head -1 | awk '{print $2}')" \
        -v p="$(grep -oE 'p99 [0-9.]+ ms' "$dir/bench.out" | head -1 | awk '{print $2}')" \
        -v l="$before" -v L="$after" -v b="$bench_cpu" -v m="$busy_before" -v M="$busy_after" \
        'BEGIN { printf "%8d transfers/s  p99 %7.2f ms  ledgerd %6.2f  bench %6.2f  machine %6.2f us/transfer\n", r, p, (L - l) * 1e6 / n, b * 1e6 / n, (M - m) * 1e6 / n }'
    rm -rf "$dir"
}
for _ in $(seq "$rounds"); do
    printf 'A '; one "$a" "$@"
    printf 'B '; one "$b" "$@"
done
