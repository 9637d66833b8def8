#!/usr/bin/env bash
# Instructions ledgerd (or the bench) executes per call: a gRPC health check (the ceiling's no-op) and a
# one-transfer call (workload (b)), counted by valgrind's callgrind. Unlike CPU time on this
# shared machine, the counts repeat from run to run within 1-2% (batch sizes under valgrind vary
# a little), so they can judge a change too small for the noise of ab.sh. They leave out what callgrind cannot see: the kernel, cache
# misses, and waiting (docs/benchmarks.md compares them with CPU time).
#
# Each mode starts ledgerd under callgrind with counting off, lets the bench set up and warm
# up, counts for WINDOW seconds, and divides by the calls made in that window (callgrind's own
# count of calls into the service's handler). Under valgrind the process runs on one core about
# 50 times slower, so batches are smaller than at full speed and the leader's share per call is
# larger.
#
# With PROCESS=bench the bench runs under callgrind instead (and ledgerd at full speed): the
# load generator's own instructions per call, which count against (b)'s share of the ceiling
# as much as ledgerd's do (63 900 per health check and 76 600 per transfer call at 9bbcef6).
#
# Usage: [PROCESS=ledgerd|bench] crates/bench/instructions.sh [LEDGERD] [CLIENTS] [WINDOW]
#   (default target/release/ledgerd, 16 clients, 15 s). Needs valgrind (callgrind_control,
#   callgrind_annotate). About two minutes.
set -euo pipefail
bin=${1:-target/release/ledgerd}
clients=${2:-16}
window=${3:-15}
bench=${BENCH:-target/release/ledger-bench}
process=${PROCESS:-ledgerd}
warmup=20
case "$process" in
ledgerd | bench) ;;
*)
    echo "PROCESS must be ledgerd or bench, not $process" >&2
    exit 2
    ;;
esac

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

# The function called once per call in each process and mode (an async fn's body is inlined
# into its caller in the bench, so there it is the drop of the call's future).
handler_of() {
    case "$process/$1" in
    ledgerd/health) echo '<tonic_health::server::HealthService as tonic_health::generated::grpc_health_v1::health_server::Health>::check' ;;
    ledgerd/transfer) echo '<ledger_server::service::Ledger as ledger_proto::ledger::v1::ledger_service_server::LedgerService>::transfer' ;;
    bench/health) echo 'core::ptr::drop_in_place<tonic_health::generated::grpc_health_v1::health_client::HealthClient<tonic::transport::channel::Channel>::check<tonic_health::generated::grpc_health_v1::HealthCheckRequest>::{{closure}}>' ;;
    bench/transfer) echo 'core::ptr::drop_in_place<ledger_proto::ledger::v1::ledger_service_client::LedgerServiceClient<tonic::transport::channel::Channel>::transfer<ledger_proto::ledger::v1::Transfer>::{{closure}}>' ;;
    esac
}

for mode in health transfer; do
    dir=$(mktemp -d)
    port=$((20000 + RANDOM % 20000))
    server=("$bin" start --listen "127.0.0.1:$port" --shards 16 --data-dir "$dir/data")
    if [ "$mode" = health ]; then
        args=(--count 0 --ceiling-secs $((2 * (warmup + window + 10))))
    else
        args=(--duration $((warmup + window + 10)) --ceiling-secs 0)
    fi
    client=("$bench" --addr "http://127.0.0.1:$port" --clients "$clients" "${args[@]}")
    callgrind=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/cg")
    if [ "$process" = ledgerd ]; then server=("${callgrind[@]}" "${server[@]}"); fi
    if [ "$process" = bench ]; then client=("${callgrind[@]}" "${client[@]}"); fi
    "${server[@]}" >"$dir/ledgerd.log" 2>&1 &
    spid=$!
    for _ in $(seq 600); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
    "${client[@]}" >"$dir/bench.out" 2>&1 &
    cpid=$!
    if [ "$process" = ledgerd ]; then vpid=$spid; else vpid=$cpid; fi
    sleep "$warmup"
    callgrind_control -i on "$vpid" >/dev/null 2>&1
    sleep "$window"
    callgrind_control -i off "$vpid" >/dev/null 2>&1
    callgrind_control -d "$vpid" >/dev/null 2>&1
    wait "$cpid" || true
    kill -INT "$spid"
    wait "$spid" || true
    total=$(callgrind_annotate "$dir/cg.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    calls=$(calls_into "$dir/cg.1" "$(handler_of "$mode")")
    awk -v m="$mode" -v p="$process" -v t="$total" -v n="$calls" \
        'BEGIN { printf "%-8s %8d calls counted  %s %8.0f instructions/call\n", m, n, p, (n > 0 ? t / n : 0) }'
    rm -rf "$dir"
done
