#!/usr/bin/env bash
# Runs every workload of docs/benchmarks.md's current table, one after another, with the
# commands shown there. Each run starts its own ledgerd (16 shards, fresh temporary directory)
# and, with --target both, its own throwaway PostgreSQL; each ends with its audit.
# Takes about seven minutes. Usage: crates/bench/suite.sh [extra ledger-bench flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin ledgerd --bin ledger-bench
bench=target/release/ledger-bench
run() {
    echo "### $*"
    "$bench" "$@"
    echo
}
run --batch 8000 --clients 4 --duration 30 "$@"
run --target both --clients 256 --duration 10 "$@"
# (b) again without durability (the memory store): what the rest of a call costs, for the
# analysis of what bounds (b); not a workload of the table's targets.
run --clients 256 --duration 10 --store memory "$@"
run --target both --clients 64 --duration 8 "$@"
run --target both --clients 256 --hot-accounts 10 --hot-percent 90 --duration 10 --ceiling-secs 0 "$@"
run --clients 256 --cross-percent 50 --duration 10 --ceiling-secs 0 "$@"
run --accounts 1000000 --zipf 1.0 --clients 256 --duration 15 --ceiling-secs 0 "$@"
