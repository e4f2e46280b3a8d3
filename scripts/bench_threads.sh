#!/usr/bin/env bash
# --threads against --workers, for a handler that sleeps (5 ms, stands for
# I/O) and one that computes (2 ms of CPU): calls/s, the service's CPU time
# per call and its peak memory, with N handlers at once either way (threads
# on one connection, or workers with a connection each).
#
#   scripts/bench_threads.sh BIN_DIR SECONDS [RESULTS_JSONL]
#
# Needs a running broker whose URL files are in $MQRPC_STATE_DIR (bench.sh
# runs it on its own broker). Prints one table; appends JSON lines (kind
# "threads") to RESULTS_JSONL when given. Each run is bounded: SECONDS of
# measurement plus start-up, and every process it starts is stopped by PID.
set -euo pipefail

bin=${1:?usage: bench_threads.sh BIN_DIR SECONDS [RESULTS_JSONL]}
secs=${2:?usage: bench_threads.sh BIN_DIR SECONDS [RESULTS_JSONL]}
results=${3:-}
queue=service_bench_tw
svc_pid=''

stop_service() {
    [[ -n $svc_pid ]] || return 0
    kill -TERM "$svc_pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$svc_pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$svc_pid" 2>/dev/null || true
    wait "$svc_pid" 2>/dev/null || true
    svc_pid=''
}
trap stop_service EXIT

# CPU ticks (user + system) of a process so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run_one KIND BODY MODE N: one service_work with MODE N (--threads or
# --workers), loaded by 4 connections x 8 calls in flight; prints a row.
run_one() {
    local kind=$1 body=$2 mode=$3 n=$4 out t0 t1 calls rate p50 rss cpu_us
    local log
    log=$(mktemp)
    "$bin/service_work" --queue "$queue" "$mode" "$n" >"$log" 2>&1 </dev/null &
    svc_pid=$!
    for _ in $(seq 200); do
        grep -q pronto "$log" && break
        sleep 0.05
    done
    t0=$(cpu_ticks "$svc_pid")
    out=$("$bin/rpc_bench" --json -d "$secs" -c 8 --connections 4 \
        --warmup 50 --timeout 30000 "$queue" "$body")
    t1=$(cpu_ticks "$svc_pid")
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$svc_pid/status")
    stop_service
    rm -f "$log"
    read -r calls rate p50 < <(python3 -c '
import json, sys
d = json.loads(sys.argv[1])
print(d["calls"], round(d["calls_per_s"]), d["p50_us"])' "$out")
    cpu_us=$(((t1 - t0) * 1000000 / $(getconf CLK_TCK) / (calls > 0 ? calls : 1)))
    printf '%-8s %-12s %8s %10s %12s %10s\n' "$kind" "$mode $n" "$rate" \
        "$p50" "$cpu_us" "$rss"
    if [[ -n $results ]]; then
        printf '{"kind":"threads","handler":"%s","mode":"%s","n":%s,"calls_per_s":%s,"p50_us":%s,"service_cpu_us_per_call":%s,"service_peak_rss_kib":%s}\n' \
            "$kind" "${mode#--}" "$n" "$rate" "$p50" "$cpu_us" "$rss" >>"$results"
    fi
}

printf '%-8s %-12s %8s %10s %12s %10s\n' handler mode calls/s p50_us \
    cpu_us/call rss_KiB
run_one sleep '{"ms": 5}' --threads 8
run_one sleep '{"ms": 5}' --workers 8
run_one cpu '{"cpu_ms": 2}' --threads 2
run_one cpu '{"cpu_ms": 2}' --workers 2
