#!/usr/bin/env bash
# Instructions ledgerd executes per call: a gRPC health check (the ceiling's no-op) and a
# one-transfer call (workload (b)), counted by valgrind's callgrind. Unlike CPU time on this
# shared machine, the counts repeat from run to run within about 1%, so they can judge a change
# too small for the noise of ab.sh. They leave out what callgrind cannot see: the kernel, cache
# misses, and waiting (docs/benchmarks.md compares them with CPU time).
#
# Each mode starts ledgerd under callgrind with counting off, lets the bench set up and warm
# up, counts for WINDOW seconds, and divides by the calls made in that window (callgrind's own
# count of calls into the service's handler). Under valgrind the process runs on one core about
# 50 times slower, so batches are smaller than at full speed and the leader's share per call is
# larger.
#
# Usage: crates/bench/instructions.sh [LEDGERD] [CLIENTS] [WINDOW]
#   (default target/release/ledgerd, 16 clients, 15 s). Needs valgrind (callgrind_control,
#   callgrind_annotate). About two minutes.
set -euo pipefail
bin=${1:-target/release/ledgerd}
clients=${2:-16}
window=${3:-15}
bench=${BENCH:-target/release/ledger-bench}
warmup=20

# calls_into FILE NAME: calls recorded into the function named NAME.
calls_into() {
    awk -v pat="$2" '
        /^c?fn=\(/ {
            id = $0; sub(/^c?fn=\(/, "", id); sub(/\).*/, "", id)
            name = $0; if (sub(/^c?fn=\([0-9]+\) /, "", name)) names[id] = name
            if ($0 ~ /^cfn=/) callee = names[id]
        }
        /^calls=/ { if (callee == pat) { n = $0; sub(/^calls=/, "", n); sub(/ .*/, "", n); total += n } }
        END { print total + 0 }
    ' "$1"
}

for mode in health transfer; do
    dir=$(mktemp -d)
    port=$((20000 + RANDOM % 20000))
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/cg" \
        "$bin" start --listen "127.0.0.1:$port" --shards 16 --data-dir "$dir/data" \
        >"$dir/ledgerd.log" 2>&1 &
    vpid=$!
    for _ in $(seq 600); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
    if [ "$mode" = health ]; then
        args=(--count 0 --ceiling-secs $((2 * (warmup + window + 10))))
        handler='<tonic_health::server::HealthService as tonic_health::generated::grpc_health_v1::health_server::Health>::check'
    else
        args=(--duration $((warmup + window + 10)) --ceiling-secs 0)
        handler='<ledger_server::service::Ledger as ledger_proto::ledger::v1::ledger_service_server::LedgerService>::transfer'
    fi
    "$bench" --addr "http://127.0.0.1:$port" --clients "$clients" "${args[@]}" >"$dir/bench.out" 2>&1 &
    bpid=$!
    sleep "$warmup"
    callgrind_control -i on "$vpid" >/dev/null 2>&1
    sleep "$window"
    callgrind_control -i off "$vpid" >/dev/null 2>&1
    callgrind_control -d "$vpid" >/dev/null 2>&1
    wait "$bpid" || true
    kill -INT "$vpid"
    wait "$vpid" || true
    total=$(callgrind_annotate "$dir/cg.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    calls=$(calls_into "$dir/cg.1" "$handler")
    awk -v m="$mode" -v t="$total" -v n="$calls" \
        'BEGIN { printf "%-8s %8d calls counted  ledgerd %8.0f instructions/call\n", m, n, (n > 0 ? t / n : 0) }'
    rm -rf "$dir"
done
