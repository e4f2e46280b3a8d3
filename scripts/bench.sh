#!/usr/bin/env bash
# The benchmark: one run, one private broker, every implementation measured
# back to back so the ratios between them mean something on a noisy machine.
#
#   scripts/bench.sh [--quick] [--costs] [--cluster]
#
# Builds a Release tree in build-bench/ (no sanitizers), starts a private
# broker of its own (state in var/bench, port $MQRPC_BENCH_PORT, default
# 5702), then measures a soma call with:
#   - rpc_bench against service_soma: 1 and 64 in flight, prefetch 1 and 64,
#     exclusive reply queue and direct reply-to;
#   - bench/bare_pingpong: bare rabbitmq-c, no JSON, no library (the floor);
#   - bench/go: the same as the floor in Go with amqp091-go (the Go peer);
#   - bench/seed_rpc.py: the seed's Python/pika client and service;
#   - scaling: service_work with 5 ms of work, 1, 2, 4 and 8 instances;
#   - --threads against --workers (scripts/bench_threads.sh): a sleeping and
#     a computing handler, calls/s, CPU per call, peak memory;
#   - memory: a service's peak RSS under load, a client's RSS over
#     1,000,000 calls, and valgrind on a service and on rpc_bench;
#   - instructions per call (callgrind) of client and service, ours and the
#     floor, and the price of each guarantee (confirms, mandatory,
#     expiration, durable, TLS: on and off at 1 and 64 in flight), printed
#     as two more tables (bench/report_costs.py).
#   - open loop: rpc_bench --rate, bare_pingpong call --rate and the Go
#     peer's call --rate at rates
#     from 5% to 100% of the measured pipelined capacity (prefetch 64),
#     latency from each call's scheduled start; plotted against the offered
#     load (build-bench/load.svg and .png, copied to docs/);
#   - many clients: 100 connections with one call in flight each, against
#     two instances (prefetch 1), ours, the floor and the Go peer.
# Implementations take turns for 3 rounds of 3 s (medians are reported),
# and the 1-in-flight comparison is repeated with everything on one CPU.
# Prints one table with the ratios and the targets; writes the raw JSON lines
# to build-bench/results.jsonl and a latency plot to build-bench/latency.svg.
# --quick: two rounds of 2 s, 100,000 calls for the memory run, no valgrind
# leak check, a sweep of 5 rates of 1 s, fewer calls under callgrind.
# --costs: only the instructions per call and the guarantee table (the goal
# ratios then need a results.jsonl from a full run).
# --cluster: only the cluster part (scripts/bench_cluster.sh): a three-node
# cluster of its own (port $MQRPC_BENCH_CLUSTER_PORT, default 5730), quorum
# against classic queues at 1 and 64 in flight, and three instances spread
# over the nodes against one; a Markdown table, JSON lines in
# build-bench/cluster.jsonl.
# The broker's state directory is $MQRPC_STATE_DIR if set, else var/bench.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"
quick=0
costs_only=0
cluster_only=0
for arg in "$@"; do
    case $arg in
    --quick) quick=1 ;;
    --costs) costs_only=1 ;;
    --cluster) cluster_only=1 ;;
    *)
        echo "usage: scripts/bench.sh [--quick] [--costs] [--cluster]" >&2
        exit 2
        ;;
    esac
done
secs=3
rounds=3
long_calls=1000000
if ((quick)); then
    secs=2
    rounds=2
    long_calls=100000
fi

out=$repo/build-bench
bin=$out/bin
results=$out/results.jsonl
export MQRPC_STATE_DIR=${MQRPC_STATE_DIR:-$repo/var/bench}
export MQRPC_BROKER_PORT=${MQRPC_BENCH_PORT:-5702}
export MQRPC_BROKER_MANAGEMENT=0
unset AMQP_URL
# The broker also listens with TLS, for the TLS row of the guarantee table;
# everything else uses the plain port (split_tls_urls).
export MQRPC_BROKER_TLS=1
logs=$MQRPC_STATE_DIR/log
py=/usr/bin/python3 # Debian's, which has python3-pika

say() { printf '==> %s\n' "$*" >&2; }
die() {
    echo "bench: $*" >&2
    exit 1
}

# ------------------------------------------------------- processes we own
pids=()
started_broker=0
pinned=0

stop_services() {
    local pid i
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
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
    if ((pinned)); then
        taskset -a -p -c "0-$(($(nproc) - 1))" "$broker_pid" >/dev/null
    fi
    if ((started_broker)); then
        "$repo/scripts/broker.sh" stop >/dev/null
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME READY_TEXT CMD...: runs CMD in the background, logs to
# $logs/NAME.log, waits until READY_TEXT is on its stdout.
start() {
    local name=$1 ready=$2 i
    shift 2
    "$@" >"$logs/$name.log" 2>&1 &
    pids+=($!)
    for ((i = 0; i < 200; i++)); do
        grep -q -- "$ready" "$logs/$name.log" 2>/dev/null && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 0.05
    done
    cat "$logs/$name.log" >&2
    die "$name did not start"
}

# cpu_ticks PID...: user+system clock ticks used so far by these processes.
cpu_ticks() {
    local pid sum=0 t
    for pid in "$@"; do
        # fields 14 and 15 of /proc/PID/stat, after the ")" that ends comm
        t=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null |
            awk '{print $12 + $13}') || t=0
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}

# record LABEL CMD...: runs one measurement, appends its JSON line (with
# "label" and the CPU time per call of broker, services and client added)
# to the results.
record() {
    local label=$1 line b0 s0 b1 s1 client hz
    shift
    say "$label"
    hz=$(getconf CLK_TCK)
    b0=$(cpu_ticks "$broker_pid")
    s0=$(cpu_ticks "${pids[@]}")
    # times: the subshell's children's user and system time, on line 2
    line=$( ("$@" | tail -n 1 || exit 1; times) ) || die "$label failed: $line"
    b1=$(cpu_ticks "$broker_pid")
    s1=$(cpu_ticks "${pids[@]}")
    client=$(tail -n 1 <<<"$line")
    line=$(head -n 1 <<<"$line")
    printf '%s\n' "$line" | $py -c '
import json, re, sys
d = json.loads(sys.stdin.read())
label, hz, broker, service, client = sys.argv[1:6]
secs = [int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", client)]
calls = d["calls"] or 1
d["label"] = label
d["cpu_us_per_call"] = {
    "broker": int(broker) / int(hz) * 1e6 / calls,
    "service": int(service) / int(hz) * 1e6 / calls,
    "client": sum(secs) * 1e6 / calls,
}
print(json.dumps(d))' "$label" "$hz" $((b1 - b0)) $((s1 - s0)) "$client" \
        >>"$results"
}

peak_rss_kib() {
    awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0
}

# ------------------------------------------------- the costs (issue 14)
costs=$out/costs.jsonl

# split_tls_urls: with MQRPC_BROKER_TLS=1 the broker writes amqps:// URL
# files; the TLS ones are kept as <role>-tls.url for the guarantee table and
# the files our programs read by role get the plain port again, so every
# other row measures what it always did.
split_tls_urls() {
    local role f url rest
    for role in clients services; do
        f=$MQRPC_STATE_DIR/$role.url
        url=$(<"$f")
        [[ $url == amqps://* ]] || continue
        (umask 077 && printf '%s\n' "$url" >"$MQRPC_STATE_DIR/$role-tls.url")
        rest=${url#amqps://}
        (umask 077 && printf 'amqp://%s@127.0.0.1:%s/\n' "${rest%%@*}" \
            "$MQRPC_BROKER_PORT" >"$f.tmp") && mv -f "$f.tmp" "$f"
    done
}

# callgrind_total FILE: the instructions callgrind counted.
callgrind_total() {
    awk '/^(summary|totals):/ {print $2; exit}' "$1"
}

# insns_per_call: instructions per call of client and service, ours
# (rpc_bench, service_soma) and the floor (bare_pingpong call, serve), one
# call in flight. Each runs twice under callgrind, with n1 and n2 calls; the
# difference over n2 - n1 calls cancels start-up, connection and exit. The
# other side of each pair runs natively. callgrind counts user space only:
# system calls count as the instructions that make them, and `rep` string
# instructions once per iteration.
insns_per_call() {
    local n1=2000 n2=12000 n who side cg f pid i
    ((quick)) && n1=500 n2=3000
    cg=(valgrind --tool=callgrind --dump-instr=no)
    for n in "$n1" "$n2"; do
        say "callgrind: clients, $n calls"
        start p1soma "pronto" "$bin/service_soma" --queue service_ipc
        start p1bare "ready" "${svc[@]}" "$bin/bare_pingpong" serve \
            --queue service_ipc_bare --prefetch 1
        "${cg[@]}" --callgrind-out-file="$out/cg-ours-client-$n.out" \
            "$bin/rpc_bench" -n "$n" --warmup 0 service_ipc '{"a":1,"b":2}' \
            >"$logs/cg-ours-client.log" 2>&1 || die "callgrind rpc_bench failed"
        "${cli[@]}" "${cg[@]}" --callgrind-out-file="$out/cg-bare-client-$n.out" \
            "$bin/bare_pingpong" call -n "$n" --warmup 0 \
            --queue service_ipc_bare >"$logs/cg-bare-client.log" 2>&1 ||
            die "callgrind bare_pingpong call failed"
        stop_services
        say "callgrind: services, $n calls"
        for who in ours bare; do
            f=$out/cg-$who-service-$n.out
            if [[ $who == ours ]]; then
                "${cg[@]}" --callgrind-out-file="$f" "$bin/service_soma" \
                    --queue service_ipc >"$logs/cg-$who-service.log" 2>&1 &
            else
                "${svc[@]}" "${cg[@]}" --callgrind-out-file="$f" \
                    "$bin/bare_pingpong" serve --queue service_ipc_bare \
                    --prefetch 1 >"$logs/cg-$who-service.log" 2>&1 &
            fi
            pid=$!
            for ((i = 0; i < 400; i++)); do
                grep -q "pronto\|ready" "$logs/cg-$who-service.log" && break
                sleep 0.05
            done
            if [[ $who == ours ]]; then
                "$bin/rpc_bench" -n "$n" --warmup 0 service_ipc \
                    '{"a":1,"b":2}' >/dev/null 2>&1
            else
                "${cli[@]}" "$bin/bare_pingpong" call -n "$n" --warmup 0 \
                    --queue service_ipc_bare >/dev/null 2>&1
            fi || {
                kill -TERM "$pid"
                wait "$pid" || true
                die "the client of callgrind $who service failed"
            }
            kill -TERM "$pid"
            wait "$pid" || die "callgrind $who service failed"
        done
    done
    # The client's share of each guarantee, which the noisy calls/s of the
    # guarantee table cannot show (the broker's share callgrind cannot see).
    local cfg opts
    start ksoma "pronto" "$bin/service_soma" --queue service_ipc
    for cfg in on no-confirms no-mandatory no-expiration none; do
        case $cfg in
        on) opts=() ;;
        none) opts=(--no-confirms --no-mandatory --no-expiration) ;;
        *) opts=("--$cfg") ;;
        esac
        say "callgrind: rpc_bench_knobs $cfg"
        for n in "$n1" "$n2"; do
            "${cg[@]}" --callgrind-out-file="$out/cg-knobs-$cfg-$n.out" \
                "$bin/rpc_bench_knobs" -n "$n" --warmup 0 "${opts[@]}" \
                service_ipc '{"a":1,"b":2}' >"$logs/cg-knobs.log" 2>&1 ||
                die "callgrind rpc_bench_knobs $cfg failed"
        done
        printf '{"label":"insns knobs %s","n1":%d,"n2":%d,"i1":%s,"i2":%s}\n' \
            "$cfg" "$n1" "$n2" \
            "$(callgrind_total "$out/cg-knobs-$cfg-$n1.out")" \
            "$(callgrind_total "$out/cg-knobs-$cfg-$n2.out")" >>"$costs"
    done
    stop_services
    for who in ours bare; do
        for side in client service; do
            printf '{"label":"insns %s %s","n1":%d,"n2":%d,"i1":%s,"i2":%s}\n' \
                "$who" "$side" "$n1" "$n2" \
                "$(callgrind_total "$out/cg-$who-$side-$n1.out")" \
                "$(callgrind_total "$out/cg-$who-$side-$n2.out")" >>"$costs"
        done
    done
}

# guarantee_prices: calls/s and p50 with each guarantee on (as shipped) and
# off, at 1 and 64 in flight, against service_soma at prefetch 64, all with
# rpc_bench_knobs (rpc_bench plus the --no-* options), in turns over the
# rounds. Durable: persistent requests, a durable reply queue and a durable
# service queue. TLS: client and service over amqps://.
guarantee_prices() {
    local results=$costs r c i cfg tls_ok=0
    local kb=("$bin/rpc_bench_knobs" --json -d "$secs")
    local cfgs=(on no-confirms no-mandatory no-expiration none durable tls)
    start gsoma "pronto" "$bin/service_soma" --prefetch 64
    start gsoma-durable "pronto" "$bin/service_soma" --prefetch 64 --durable \
        --queue service_bench_durable
    if [[ -f $MQRPC_STATE_DIR/services-tls.url ]]; then
        start gsoma-tls "pronto" "$bin/service_soma" --prefetch 64 \
            --url-file "$MQRPC_STATE_DIR/services-tls.url" \
            --queue service_bench_tls
        tls_ok=1
    fi
    # one unrecorded second each (warm's -d would come after the queue)
    "${kb[0]}" -d 1 -c 64 --warmup 0 >/dev/null 2>&1 ||
        die "warm-up of rpc_bench_knobs failed"
    "${kb[0]}" -d 1 -c 64 --warmup 0 --durable --expect 3 \
        service_bench_durable '{"a":1,"b":2}' >/dev/null 2>&1 ||
        die "warm-up of rpc_bench_knobs --durable failed"
    if ((tls_ok)); then
        "${kb[0]}" -d 1 -c 64 --warmup 0 --expect 3 \
            --url-file "$MQRPC_STATE_DIR/clients-tls.url" service_bench_tls \
            '{"a":1,"b":2}' >/dev/null 2>&1 ||
            die "warm-up of rpc_bench_knobs over TLS failed"
    fi
    for ((r = 1; r <= rounds; r++)); do
        for c in 1 64; do
            # each round starts with the next one, so none always
            # follows the same neighbour's load
            for ((i = 0; i < ${#cfgs[@]}; i++)); do
                cfg=${cfgs[(i + r) % ${#cfgs[@]}]}
                case $cfg in
                on) record "price $cfg c=$c #$r" "${kb[@]}" -c "$c" ;;
                none)
                    record "price $cfg c=$c #$r" "${kb[@]}" -c "$c" \
                        --no-confirms --no-mandatory --no-expiration
                    ;;
                durable)
                    record "price $cfg c=$c #$r" "${kb[@]}" -c "$c" --durable \
                        --expect 3 service_bench_durable '{"a":1,"b":2}'
                    ;;
                tls)
                    ((tls_ok)) || continue
                    record "price $cfg c=$c #$r" "${kb[@]}" -c "$c" \
                        --url-file "$MQRPC_STATE_DIR/clients-tls.url" \
                        --expect 3 service_bench_tls '{"a":1,"b":2}'
                    ;;
                *) record "price $cfg c=$c #$r" "${kb[@]}" -c "$c" "--$cfg" ;;
                esac
            done
        done
    done
    stop_services
}

# ------------------------------------------------ open loop, many clients
# rpc_bench, bare_pingpong call and the Go peer take the same flags (-c,
# --connections, -d, --warmup, --rate) and print the same JSON fields, so
# sweep_impl and many_clients take any of them as CMD.

# record_rows NAME CMD...: runs an open-loop measurement, appends each of
# its JSON lines (one per rate) to the results, labelled "sweep NAME @RATE".
record_rows() {
    local name=$1 out
    shift
    say "sweep $name: ${*: -1} calls/s"
    out=$("$@") || die "sweep $name failed: $out"
    printf '%s\n' "$out" | $py -c '
import json, sys
for line in sys.stdin:
    if line.strip():
        d = json.loads(line)
        d["label"] = "sweep %s @%g" % (sys.argv[1], d["rate"])
        d["sweep"] = sys.argv[1]
        print(json.dumps(d))' "$name" >>"$results"
}

# sweep_impl NAME RATE CMD...: one implementation offered RATE calls/s for
# $sweep_secs on one connection (as the closed-loop rows that set the
# rates), after 1000 unmeasured calls (a fresh reply queue is slow for its
# first thousand messages).
sweep_impl() {
    local name=$1 rate=$2
    shift 2
    record_rows "$name" "$@" --warmup 1000 -d "$sweep_secs" --rate "$rate"
}

# sweep_rates_from CALLS_PER_S: the sweep's rates, fractions of the given
# closed-loop pipelined capacity, so that the sweep crosses the knee
# whatever the machine does. Calls that come one by one are not batched
# (each is its own TCP segment, broker wake-up and confirm), so the open
# loop saturates well below the pipelined closed loop: on the 2-core VM at
# a third to two thirds of it.
sweep_rates_from() {
    local cap=$1 f rates=''
    local fr=(0.05 0.1 0.2 0.3 0.4 0.5 0.7 1.0)
    ((quick)) && fr=(0.1 0.2 0.35 0.5 0.8)
    for f in "${fr[@]}"; do
        rates+=${rates:+,}$(awk -v c="$cap" -v f="$f" \
            'BEGIN {r = int(c * f / 100 + 0.5) * 100; print r < 100 ? 100 : r}')
    done
    echo "$rates"
}

# many_clients NAME R CMD...: round R of the "many clients" row for one
# implementation: 100 connections, one call in flight each (the shape of a
# web tier calling a service).
many_clients() {
    local name=$1 r=$2
    shift 2
    record "many clients $name 100x1 2 inst #$r" "$@" --connections 100 \
        -c 1 -d "$secs" --warmup 20
}

# take_turns ROUND PREFIX NAME... -- ARGS...: calls PREFIX_NAME ARGS for
# each NAME, starting with a different one each round, so that none always
# runs right after another's load.
take_turns() {
    local r=$1 prefix=$2 i
    shift 2
    local names=() args=()
    while (($#)) && [[ $1 != -- ]]; do
        names+=("$1")
        shift
    done
    shift
    args=("$@")
    for ((i = 0; i < ${#names[@]}; i++)); do
        "${prefix}_${names[(r + i) % ${#names[@]}]}" "${args[@]}"
    done
}

# ------------------------------------------------------------------- setup
"$repo/scripts/deps.sh" --bench
say "building Release into build-bench/"
cmake -S "$repo" -B "$out" -DCMAKE_BUILD_TYPE=Release -DMQRPC_TESTS=OFF -DMQRPC_WERROR=ON \
    -DMQRPC_STATE_DIR="$repo/var" -DMQRPC_BENCH_GO=ON \
    >"$out.cmake.log" 2>&1 || {
    cat "$out.cmake.log" >&2
    die "cmake failed"
}
make -C "$out" -j2 --no-print-directory >"$out.make.log" 2>&1 || {
    tail -n 30 "$out.make.log" >&2
    die "build failed"
}
rm -f "$out.cmake.log" "$out.make.log"

if ((cluster_only)); then
    : >"$out/cluster.jsonl"
    exec bash "$repo/scripts/bench_cluster.sh" "$bin" "$secs" "$rounds" "$out/cluster.jsonl"
fi

if ! "$repo/scripts/broker.sh" status >/dev/null 2>&1; then
    "$repo/scripts/broker.sh" start >&2
    started_broker=1
fi
split_tls_urls
# bare_pingpong and the seed take their URL from AMQP_URL, not the command
# line (where ps shows passwords); our programs find the URL files by role.
svc=(env "AMQP_URL=$(<"$MQRPC_STATE_DIR/services.url")")
cli=(env "AMQP_URL=$(<"$MQRPC_STATE_DIR/clients.url")")
broker_pid=$(<"$MQRPC_STATE_DIR/broker.pid")
mkdir -p "$logs"
if ((!costs_only)); then
    : >"$results"
    : >"$costs"
fi
rb=("$bin/rpc_bench" --json -d "$secs")

# The implementations take turns, round after round, and the report keeps
# each one's median: a slow second on this shared machine then costs every
# implementation alike instead of deciding a ratio.
seed=($py "$repo/bench/seed_rpc.py")
# c=1 and c=64 against services at prefetch 1; PIN: a taskset prefix
round_p1() {
    local r=$1 pin=("${@:2}") i
    local c1=(c1_mqrpc c1_bare c1_seed c1_go)
    # Each round starts with the next implementation, so none always runs
    # right after another's load.
    for ((i = 0; i < ${#c1[@]}; i++)); do
        "${c1[(r + i) % ${#c1[@]}]}" "$r" "${pin[@]}"
    done
    [[ -n $tag ]] && return 0 # one CPU: the latency comparison only
    record "mqrpc c=1 p=1 direct #$r" "${rb[@]}" -c 1 --direct-reply-to
    local c64=(c64_mqrpc c64_bare c64_seed c64_go)
    for ((i = 0; i < ${#c64[@]}; i++)); do
        "${c64[(r + i) % ${#c64[@]}]}" "$r"
    done
    record "mqrpc c=64 p=1 direct #$r" "${rb[@]}" -c 64 --direct-reply-to
}
c1_mqrpc() {
    record "mqrpc c=1 p=1$tag #$1" "${@:2}" "${rb[@]}" -c 1 \
        ${hist:+--hist "$out/lat-mqrpc-c1.dat"}
}
c1_bare() {
    record "bare c=1 p=1$tag #$1" "${@:2}" "${cli[@]}" "$bin/bare_pingpong" \
        call -c 1 -d "$secs"
}
c1_seed() {
    record "seed c=1 p=1$tag #$1" "${@:2}" "${cli[@]}" "${seed[@]}" call \
        -c 1 -d "$secs"
}
c64_mqrpc() { record "mqrpc c=64 p=1 #$1" "${rb[@]}" -c 64; }
c64_bare() {
    record "bare c=64 p=1 #$1" "${cli[@]}" "$bin/bare_pingpong" call \
        -c 64 -d "$secs"
}
c64_seed() {
    record "seed c=64 p=1 #$1" "${cli[@]}" "${seed[@]}" call -c 64 \
        -d "$secs"
}

start_p1() {
    local pin=("$@")
    start soma1 "pronto" "${pin[@]}" "$bin/service_soma"
    start bare1 "ready" "${pin[@]}" "${svc[@]}" "$bin/bare_pingpong" serve \
        --prefetch 1
    start seed1 "ready" "${pin[@]}" "${svc[@]}" "${seed[@]}" serve
    go_start 1 "${pin[@]}"
}

# warm CMD...: one unrecorded second of load, so that no implementation
# measures the broker's warm-up (new queues and channels are slower for
# their first few thousand messages).
warm() {
    "$@" -d 1 >/dev/null 2>&1 || die "warm-up failed: $*"
}

if ((costs_only)); then
    : >"$costs"
    insns_per_call
    guarantee_prices
    $py "$repo/bench/report_costs.py" "$costs" "$results"
    exit 0
fi
# ------------------------------------------------------------ the Go peer
# bench/go/go_pingpong: the floor's AMQP pattern and command line in Go with
# amqp091-go. Its service listens on a queue of its own, so it can run next
# to the floor's.
gp=("$bin/go_pingpong")
go_q=(--queue service_go)

# go_start PREFETCH [PIN...]: starts the Go service and warms it up.
go_start() {
    start "go$1" "ready" "${@:2}" "${svc[@]}" "${gp[@]}" serve "${go_q[@]}" \
        --prefetch "$1"
    warm "${@:2}" "${cli[@]}" "${gp[@]}" call "${go_q[@]}" -c 64 --warmup 0
}
c1_go() {
    record "go c=1 p=1$tag #$1" "${@:2}" "${cli[@]}" "${gp[@]}" call \
        "${go_q[@]}" -c 1 -d "$secs"
}
c64_go() {
    record "go c=64 p=1 #$1" "${cli[@]}" "${gp[@]}" call "${go_q[@]}" \
        -c 64 -d "$secs"
}
p64_go() {
    record "go c=64 p=64 #$1" "${cli[@]}" "${gp[@]}" call "${go_q[@]}" \
        -c 64 -d "$secs"
}

# The open-loop sweep and the many-clients row take the Go peer through
# these (sweep_impls+=(go); go_start_many, many_impls+=(go)). The sweep
# runs against the go64 service that the pipelined rows leave running.
sweep_go() { sweep_impl go "$1" "${cli[@]}" "${gp[@]}" call "${go_q[@]}"; }
many_go() { many_clients go "$1" "${cli[@]}" "${gp[@]}" call "${go_q[@]}"; }
go_start_many() {
    local i
    for i in 1 2; do
        start "many-go$i" "ready" "${svc[@]}" "${gp[@]}" serve "${go_q[@]}" \
            --prefetch 1
    done
}

# go_smoke: the Go peer answers correctly, and speaks the floor's protocol:
# Go client to Go service (closed loop over 2 connections, and open loop),
# Go client to the floor's service, the floor's client to the Go service.
# Each client checks every reply's correlation id (and the Go one its body)
# and exits 1 on a wrong one; the call counts must be exact.
go_smoke() {
    say "Go peer: smoke check against itself and the floor"
    go_smoke_run 2000 "${gp[@]}" call "${go_q[@]}" -n 2000 -c 8 \
        --connections 2 --warmup 10
    go_smoke_run 500 "${gp[@]}" call "${go_q[@]}" --rate 1000 -n 500 \
        --connections 2 --warmup 10
    go_smoke_run 2000 "${gp[@]}" call --queue service_bare -n 2000 -c 8 \
        --warmup 10
    go_smoke_run 2000 "$bin/bare_pingpong" call "${go_q[@]}" -n 2000 -c 8 \
        --warmup 10
}
go_smoke_run() {
    local want=$1 out
    shift
    out=$("${cli[@]}" "$@" 2>&1) || die "Go smoke check failed: $* -> $out"
    grep -q "\"calls\":$want,.*\"errors\":0" <<<"$out" ||
        die "Go smoke check: want $want calls, 0 errors: $* -> $out"
}

tag='' hist=1
start_p1
warm "$bin/rpc_bench" -c 64 --warmup 0
warm "${cli[@]}" "$bin/bare_pingpong" call -c 64 --warmup 0
warm "${cli[@]}" "${seed[@]}" call -c 64 --warmup 0
go_smoke
for ((r = 1; r <= rounds; r++)); do
    round_p1 "$r"
    hist=''
done
stop_services

start soma64 "pronto" "$bin/service_soma" --prefetch 64
soma_pid=${pids[-1]}
start bare64 "ready" "${svc[@]}" "$bin/bare_pingpong" serve --prefetch 64
go_start 64
warm "$bin/rpc_bench" -c 64 --warmup 0
warm "${cli[@]}" "$bin/bare_pingpong" call -c 64 --warmup 0
p64_mqrpc() {
    record "mqrpc c=64 p=64 #$1" "${rb[@]}" -c 64 \
        ${hist:+--hist "$out/lat-mqrpc-c64.dat"}
}
p64_bare() {
    record "bare c=64 p=64 #$1" "${cli[@]}" "$bin/bare_pingpong" call \
        -c 64 -d "$secs"
}
hist=1
for ((r = 1; r <= rounds; r++)); do
    if ((r % 2)); then
        p64_mqrpc "$r"
        hist=''
        p64_bare "$r"
    else
        p64_bare "$r"
        p64_mqrpc "$r"
    fi
    p64_go "$r"
done
hist=''
record "mqrpc 4x64 p=64" "${rb[@]}" -c 64 --connections 4
soma_rss=$(peak_rss_kib "$soma_pid")
record "mqrpc memory" "$bin/rpc_bench" --json -n "$long_calls" -c 64 --warmup 20000

# Open loop against the same prefetch-64 services: rates around the
# pipelined capacity just measured (the better of ours and the floor), rate
# by rate, the implementations taking turns. Each NAME in sweep_impls has a
# function sweep_NAME RATE (another client that takes the same flags joins
# the same way as the Go peer's sweep_go).
sweep_secs=2
((quick)) && sweep_secs=1
cap=$($py -c '
import json, statistics, sys
v = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["label"].startswith(("mqrpc c=64 p=64 #", "bare c=64 p=64 #")):
        v.setdefault(d["label"].split(" #")[0], []).append(d["calls_per_s"])
print(int(max([statistics.median(x) for x in v.values()] or [10000])))' "$results")
# rpc_bench ends a call at its timeout, 5 s by default: the plot wants the
# latency of deep overloads too (the floor never gives up).
sweep_mqrpc() {
    sweep_impl mqrpc "$1" "$bin/rpc_bench" --json --timeout 60000
}
sweep_bare() { sweep_impl bare "$1" "${cli[@]}" "$bin/bare_pingpong" call; }
sweep_impls=(mqrpc bare)
sweep_impls+=(go) # sweep_go: the Go peer section
i=0
for rate in $(sweep_rates_from "$cap" | tr , ' '); do
    take_turns $((i++)) sweep "${sweep_impls[@]}" -- "$rate"
done
stop_services

# One request at a time is a chain of wake-ups (client, broker, service,
# broker, client). On this 2-core VM a wake-up across cores costs several
# times one on the same core, and that, not anyone's code, sets the pace:
# the same comparison with everything on CPU 0 shows what each
# implementation itself costs.
if command -v taskset >/dev/null; then
    taskset -a -p -c 0 "$broker_pid" >/dev/null
    pinned=1
    tag=' one-cpu'
    start_p1 taskset -c 0
    warm taskset -c 0 "$bin/rpc_bench" --warmup 0
    warm taskset -c 0 "${cli[@]}" "$bin/bare_pingpong" call --warmup 0
    warm taskset -c 0 "${cli[@]}" "${seed[@]}" call --warmup 0
    for ((r = 1; r <= rounds; r++)); do
        round_p1 "$r" taskset -c 0
    done
    stop_services
    taskset -a -p -c "0-$(($(nproc) - 1))" "$broker_pid" >/dev/null
    pinned=0
fi

# --------------------------------------------------------- many clients
# 100 connections with one call in flight each against two instances at
# prefetch 1: the shape of a web tier calling a service. The floor and the
# Go peer get two services each on a queue of their own.
start many-soma1 "pronto" "$bin/service_soma"
start many-soma2 "pronto" "$bin/service_soma"
start many-bare1 "ready" "${svc[@]}" "$bin/bare_pingpong" serve --prefetch 1
start many-bare2 "ready" "${svc[@]}" "$bin/bare_pingpong" serve --prefetch 1
# Each NAME in many_impls has a function many_NAME ROUND, and its services
# are started here (the Go peer's: go_start_many, two on service_go).
many_mqrpc() { many_clients mqrpc "$1" "$bin/rpc_bench" --json; }
many_bare() {
    many_clients bare "$1" "${cli[@]}" "$bin/bare_pingpong" call
}
many_impls=(mqrpc bare)
go_start_many # many_go: the Go peer section
many_impls+=(go)
for ((r = 1; r <= rounds; r++)); do
    take_turns "$r" many "${many_impls[@]}" -- "$r"
done
stop_services

# -------------------------------------------------------------- scaling
for n in 1 2 4 8; do
    for ((i = 1; i <= n; i++)); do
        start "work$n-$i" "pronto" "$bin/service_work" --work-ms 5
    done
    record "work5ms x$n" "${rb[@]}" -c 64 --warmup 50 \
        --expect '{"slept": 5}' service_work '{}'
    stop_services
done

insns_per_call
guarantee_prices

# --------------------------------------------------------------- valgrind
leaks="skipped (--quick)"
if ((!quick)); then
    say "valgrind: service_soma and rpc_bench, 2000 calls"
    vg=(valgrind --leak-check=full --show-leak-kinds=definite,indirect
        --errors-for-leak-kinds=definite,indirect --error-exitcode=99 -q)
    start vg-soma "pronto" "${vg[@]}" "$bin/service_soma" --queue service_bench_vg
    vg_client=0
    "${vg[@]}" "$bin/rpc_bench" -n 2000 -c 8 --warmup 10 --expect 3 \
        service_bench_vg '{"a":1,"b":2}' >"$logs/vg-client.log" 2>&1 || vg_client=$?
    stop_services
    vg_service=0
    grep -q "definitely lost\|indirectly lost\|Invalid \|uninitialised" \
        "$logs/vg-soma.log" && vg_service=1
    if ((vg_client == 0 && vg_service == 0)); then
        leaks="none (valgrind: 0 errors, 0 bytes definitely or indirectly lost)"
    else
        leaks="FOUND: see $logs/vg-soma.log and $logs/vg-client.log"
    fi
fi

# ------------------------------------------------------------------ plot
if command -v gnuplot >/dev/null; then
    gnuplot <<EOF 2>/dev/null || true
set terminal svg size 800,450 dynamic font "sans,11"
set output "$out/latency.svg"
set title "soma call latency, mqrpc (cumulative)"
set xlabel "latency (microseconds, log scale)"
set ylabel "fraction of calls at or below"
set logscale x
set grid
set key top left
plot "$out/lat-mqrpc-c1.dat" using 1:3 with lines lw 2 title "1 in flight, prefetch 1", \
     "$out/lat-mqrpc-c64.dat" using 1:3 with lines lw 2 title "64 in flight, prefetch 64"
EOF
fi

# --threads against --workers for a sleeping and a computing handler
# (issue: when to use which); its own script so it can run alone.
say "--threads against --workers (service_work: 5 ms asleep, 2 ms of CPU)"
threads_table=$(bash "$repo/scripts/bench_threads.sh" "$bin" "$secs" "$results")

# Latency against offered load, from the sweep: bench/load_data.py writes
# one file per implementation, bench/plot_load.gp draws p50 and p99 of each;
# the copy in docs/ is the README's.
rm -f "$out"/load-*.dat "$out/load.svg" "$out/load.png"
load_impls=$($py "$repo/bench/load_data.py" "$results" "$out")
if [[ -n $load_impls ]] && command -v gnuplot >/dev/null; then
    if gnuplot -e "dir='$out'; impls='$load_impls'" "$repo/bench/plot_load.gp" \
        2>"$logs/plot_load.log"; then
        mkdir -p "$repo/docs"
        cp "$out/load.svg" "$out/load.png" "$repo/docs/"
    else
        cat "$logs/plot_load.log" >&2
    fi
fi

$py "$repo/bench/report.py" "$results" --service-rss "$soma_rss" \
    --leaks "$leaks" --command "scripts/bench.sh${1:+ $1}"
echo
echo "--threads against --workers: one service_work, 4 connections x 8 calls in flight"
echo "$threads_table"
$py "$repo/bench/report_costs.py" "$costs" "$results"
[[ -f "$out/latency.svg" ]] && echo "latency plot: $out/latency.svg"
[[ -f "$out/load.svg" ]] &&
    echo "latency against load: $out/load.svg and .png (copied to docs/)"
exit 0
