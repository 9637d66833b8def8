#!/usr/bin/env bash
# Compares two ledgerd builds by alternating runs: each run starts the build on a fresh data
# directory (16 shards), drives it with ledger-bench, and prints transfers/s, p99, and the CPU
# time per transfer of ledgerd (user + system, from /proc) and of the bench (from `time`).
# CPU per transfer is steadier than the rate on a shared machine, and the bench's own CPU per
# transfer (the same work in both builds) shows how fast the machine was at that moment.
#
# Usage: crates/bench/ab.sh ROUNDS LEDGERD_A LEDGERD_B [ledger-bench flags...]
#   e.g. crates/bench/ab.sh 3 /tmp/ledgerd.before target/release/ledgerd --clients 256 --duration 20
# Env: BENCH (default target/release/ledger-bench), LEDGERD_ARGS (extra `ledgerd start` flags).
set -euo pipefail
rounds=$1 a=$2 b=$3
shift 3
bench=${BENCH:-target/release/ledger-bench}
one() {
    local bin=$1
    shift
    local port=$((20000 + RANDOM % 20000)) dir
    dir=$(mktemp -d)
    # shellcheck disable=SC2086
    "$bin" start --listen "127.0.0.1:$port" --shards 16 --data-dir "$dir/data" ${LEDGERD_ARGS:-} \
        >"$dir/ledgerd.log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    local before after
    before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    ( TIMEFORMAT='%U %S'; time "$bench" --addr "http://127.0.0.1:$port" --ceiling-secs 0 "$@" ) \
        >"$dir/bench.out" 2>"$dir/bench.time"
    after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill -INT "$pid"
    wait "$pid" || true
    local n rate p99 bench_cpu
    n=$(grep -oE 'transfers: [0-9]+' "$dir/bench.out" | head -1 | awk '{print $2}')
    rate=$(grep -oE '= [0-9]+ transfers/s' "$dir/bench.out" | head -1 | awk '{print $2}')
    p99=$(grep -oE 'p99 [0-9.]+ ms' "$dir/bench.out" | head -1 | awk '{print $2}')
    bench_cpu=$(tail -1 "$dir/bench.time" | awk '{print $1 + $2}')
    awk -v n="$n" -v r="$rate" -v p="$p99" -v l="$((after - before))" -v b="$bench_cpu" \
        -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "%8d transfers/s  p99 %7.2f ms  ledgerd %6.2f us/transfer  bench %6.2f us/transfer\n", r, p, l / hz * 1e6 / n, b * 1e6 / n }'
    rm -rf "$dir"
}
for _ in $(seq "$rounds"); do
    printf 'A '; one "$a" "$@"
    printf 'B '; one "$b" "$@"
done
