#!/usr/bin/env bash
# Quorum against classic queues on a three-node cluster, and throughput with
# service instances spread over the nodes (bench.sh --cluster).
#
#   scripts/bench_cluster.sh BIN_DIR SECONDS ROUNDS [RESULTS_JSONL]
#
# Starts a cluster of its own (scripts/broker.sh, MQRPC_BROKER_NODES=3, base
# port $MQRPC_BENCH_CLUSTER_PORT, default 5730: AMQP 5730/5732/5734;
# state in $MQRPC_BENCH_CLUSTER_DIR, default var/bench-cluster) and stops
# it at the end. Every program gets the address list of all nodes, as a user
# would give it, except where a row says otherwise. Rows:
#   - classic and quorum queue, one service_soma (prefetch 64), rpc_bench at
#     1 and 64 calls in flight on one connection;
#   - quorum queue, 3 instances, one per node (each given its node's URL
#     only), and 3 client connections x 64 in flight, against 1 instance
#     with the same clients.
# Each row: ROUNDS runs of SECONDS, the median calls/s and its latency.
# Prints one Markdown table; appends JSON lines (kind "cluster") to
# RESULTS_JSONL when given. Bounded: every run is SECONDS plus start-up, the
# cluster start at most 240 s; every process is stopped by PID.
set -euo pipefail

usage="usage: bench_cluster.sh BIN_DIR SECONDS ROUNDS [RESULTS_JSONL]"
bin=${1:?$usage}
secs=${2:?$usage}
rounds=${3:?$usage}
results=${4:-}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
broker=$repo/scripts/broker.sh
export MQRPC_STATE_DIR=${MQRPC_BENCH_CLUSTER_DIR:-$repo/var/bench-cluster}
export MQRPC_BROKER_PORT=${MQRPC_BENCH_CLUSTER_PORT:-5730}
export MQRPC_BROKER_NODES=3 MQRPC_BROKER_MANAGEMENT=0 MQRPC_BROKER_TLS=0
unset AMQP_URL MQRPC_BROKER_NODE
mkdir -p "$MQRPC_STATE_DIR"
logs=$MQRPC_STATE_DIR/log
mkdir -p "$logs"
say() { printf '==> %s\n' "$*" >&2; }
die() {
    echo "bench_cluster: $*" >&2
    exit 1
}

pids=()
started=0
stop_services() {
    local pid i
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
cleanup() {
    trap - EXIT INT TERM
    set +e
    stop_services
    ((started)) && timeout 120 "$broker" stop >/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if "$broker" status >/dev/null 2>&1; then
    die "a broker already runs in $MQRPC_STATE_DIR; stop it first"
fi
# Empty queues: a queue of an earlier run would keep its type.
rm -rf "$MQRPC_STATE_DIR"/broker/mnesia "$MQRPC_STATE_DIR"/broker-[0-9]/mnesia
say "starting a three-node cluster (base port $MQRPC_BROKER_PORT)"
started=1
timeout 240 "$broker" start >"$logs/broker.log" 2>&1 || {
    tail -n 20 "$logs/broker.log" >&2
    die "the cluster did not start"
}
svc_urls=$MQRPC_STATE_DIR/services.url
cli_urls=$MQRPC_STATE_DIR/clients.url
# node_url_file N: a URL file with node N's entry only.
node_url_file() {
    local f=$MQRPC_STATE_DIR/services-node$1.url
    (
        umask 077
        cut -d, -f"$1" "$svc_urls" >"$f"
    )
    echo "$f"
}

# start_soma NAME URL_FILE QUEUE TYPE: one service_soma, waited for.
start_soma() {
    local name=$1 i
    "$bin/service_soma" --url-file "$2" --queue "$3" --queue-type "$4" --prefetch 64 \
        >"$logs/$name.log" 2>&1 </dev/null &
    pids+=($!)
    for ((i = 0; i < 200; i++)); do
        grep -q 'pronto' "$logs/$name.log" && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 0.05
    done
    cat "$logs/$name.log" >&2
    die "$name did not start"
}

# measure LABEL TYPE INSTANCES CONNS INFLIGHT QUEUE: ROUNDS runs; prints a
# table row and appends the median's JSON line.
measure() {
    local label=$1 type=$2 inst=$3 conns=$4 c=$5 q=$6 r line
    local runs=()
    for ((r = 0; r < rounds; r++)); do
        line=$("$bin/rpc_bench" --url-file "$cli_urls" --json -d "$secs" --warmup 2000 \
            --connections "$conns" -c "$c" --timeout 30000 "$q" '{"a":1,"b":2}' 2>>"$logs/rpc_bench.log") ||
            die "rpc_bench failed on $label (see $logs/rpc_bench.log)"
        runs+=("$line")
    done
    printf '%s\n' "${runs[@]}" | /usr/bin/python3 -c '
import json, sys
label, qtype, inst, conns, c, results = sys.argv[1:7]
runs = sorted((json.loads(l) for l in sys.stdin if l.strip()), key=lambda r: r["calls_per_s"])
m = runs[len(runs) // 2]
print("| %s | %s | %s | %s x %s | %.0f | %d | %d |" % (label, qtype, inst, conns, c,
      m["calls_per_s"], m["p50_us"], m["p99_us"]))
if results:
    m = dict(m, kind="cluster", label=label, queue_type=qtype, instances=int(inst),
             connections=int(conns), inflight=int(c), rounds=len(runs))
    with open(results, "a") as f:
        f.write(json.dumps(m) + "\n")
' "$label" "$type" "$inst" "$conns" "$c" "$results"
}

echo "| row | queue | instances | connections x in flight | calls/s | p50 us | p99 us |"
echo "|---|---|---:|---:|---:|---:|---:|"
for type in classic quorum; do
    q=service_bench_$type
    say "$type queue, one instance"
    start_soma "soma-$type" "$svc_urls" "$q" "$type"
    measure "1 in flight" "$type" 1 1 1 "$q"
    measure "64 in flight" "$type" 1 1 64 "$q"
    stop_services
done
q=service_bench_quorum
say "quorum queue, three clients: one instance, then one per node"
start_soma soma-one "$svc_urls" "$q" quorum
measure "1 instance, 3 clients" quorum 1 3 64 "$q"
stop_services
for n in 1 2 3; do
    start_soma "soma-node$n" "$(node_url_file "$n")" "$q" quorum
done
measure "3 instances, one per node" quorum 3 3 64 "$q"
stop_services
