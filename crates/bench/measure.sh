# Shared by ab.sh and cost.sh (source it): start a ledgerd, run the bench against it, and read
# both processes' CPU time.

# ledgerd_start BIN DIR [flags...]: starts BIN on a free-looking port with 16 shards and data in
# DIR/data; sets PORT and PID once it listens.
ledgerd_start() {
    local bin=$1 dir=$2
    shift 2
    PORT=$((20000 + RANDOM % 20000))
    "$bin" start --listen "127.0.0.1:$PORT" --shards 16 --data-dir "$dir/data" "$@" \
        >"$dir/ledgerd.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
}

# cpu_seconds PID: user + system CPU time of a running process so far.
cpu_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}

# machine_busy_seconds: busy CPU time of the whole machine so far, all cores (user, nice,
# system, irq, softirq from /proc/stat). Unlike a process's CPU it counts the kernel threads
# that work for it, such as the file system's journal committing after an fsync.
machine_busy_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '/^cpu / {print ($2 + $3 + $4 + $7 + $8) / hz}' /proc/stat
}

# bench_timed DIR [ledger-bench flags...]: runs the bench against PORT; its output goes to
# DIR/bench.out and its CPU time (seconds) is printed.
bench_timed() {
    local dir=$1
    shift
    ( TIMEFORMAT='%U %S'; time "${BENCH:-target/release/ledger-bench}" \
        --addr "http://127.0.0.1:$PORT" "$@" ) >"$dir/bench.out" 2>"$dir/bench.time"
    tail -1 "$dir/bench.time" | awk '{print $1 + $2}'
}

# ledgerd_stop: stops PID (SIGINT, as an operator would) and waits for it.
ledgerd_stop() {
    kill -INT "$PID"
    wait "$PID" || true
}
