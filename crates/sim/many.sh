#!/usr/bin/env bash
# Runs many seeds of the simulation (default ten thousand, from seed 0) in a release build and
# ends with `seeds: N, violations: V`; a failing seed prints the command that replays it.
# Usage: crates/sim/many.sh [SEEDS] [FROM]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo run --quiet --release --bin ledger-sim -- --seeds "${1:-10000}" --from "${2:-0}"
