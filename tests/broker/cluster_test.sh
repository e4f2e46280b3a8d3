#!/usr/bin/env bash
# broker.cluster: a three-node RabbitMQ cluster of its own (scripts/broker.sh
# with MQRPC_BROKER_NODES=3, base port $MQRPC_BROKER_PORT, state in
# $MQRPC_STATE_DIR), two service_soma instances on a quorum queue connected
# to different nodes, and rpc_chaos calling soma continuously (idempotent
# calls, retries) through the address list. It SIGKILLs the node that leads
# the queue, starts it again, then SIGKILLs the node the client is connected
# to and starts it again, and checks what a user would see:
#   - every call ends with the right answer or an explicit error: none is
#     lost (never completed), answered twice or answered wrongly;
#   - answers resume after each kill (the gap is printed);
#   - both instances keep running (no restart) and, once the nodes are back,
#     both consume again (2 consumers on service_soma).
# Needs MQRPC_BIN, MQRPC_SOURCE_DIR, MQRPC_STATE_DIR, MQRPC_BROKER_PORT.
set -u

: "${MQRPC_BIN:?}" "${MQRPC_SOURCE_DIR:?}" "${MQRPC_STATE_DIR:?}" "${MQRPC_BROKER_PORT:?}"
broker=$MQRPC_SOURCE_DIR/scripts/broker.sh
export MQRPC_BROKER_NODES=3 MQRPC_BROKER_MANAGEMENT=0
unset AMQP_URL MQRPC_BROKER_NODE
readonly RATE=200          # calls per second: a steady, countable stream
readonly GAP_LIMIT_S=30    # a gap longer than this fails the test
readonly CONSUMERS_WAIT_S=60
base=$MQRPC_BROKER_PORT
state=$MQRPC_STATE_DIR
mkdir -p "$state"

say() { printf '== %s\n' "$*"; }

# A cluster from empty queues (a quorum queue of an earlier run would
# carry its messages and settings); the credentials stay.
if "$broker" status >/dev/null 2>&1; then
    timeout 120 "$broker" stop >/dev/null 2>&1
fi
rm -rf "$state"/broker/mnesia "$state"/broker-[0-9]/mnesia
say "starting three nodes (base port $base)"
t0=$(date +%s)
if ! timeout 240 "$broker" start >"$state/start.log" 2>&1; then
    cat "$state/start.log"
    timeout 120 "$broker" stop >/dev/null 2>&1
    echo "FAIL: the cluster did not start"
    exit 1
fi
say "cluster up in $(($(date +%s) - t0)) s"

# shellcheck source=tests/broker/lib.sh disable=SC1091
. "$(dirname "$0")/lib.sh"
tmpdir=${tmpdir:?lib.sh sets it}
# lib.sh's cleanup stops our processes; the cluster stops after them.
stop_cluster() {
    cleanup
    timeout 120 "$broker" stop >/dev/null 2>&1 || echo "the cluster did not stop"
}
trap stop_cluster EXIT

ctl() { timeout 30 "$broker" ctl -q "$@"; }
# node_of NAME: the 1-based index of node mqrpc<port>@localhost.
node_of() {
    local port=${1#mqrpc}
    port=${port%@*}
    echo $(((port - base) / 2 + 1))
}
# The node leading service_soma.
leader() {
    local l
    l=$(ctl list_queues name leader | awk '$1 == "service_soma" { print $2 }')
    [[ -n $l ]] && node_of "$l"
}
# The nodes a user's connections are on (pids read <node.N.N.N>), one a line.
conn_nodes() {
    ctl list_connections user pid | awk -v u="$1" '$1 == u {
        sub(/^</, "", $2); sub(/\.[0-9]+\.[0-9]+\.[0-9]+>$/, "", $2); print $2 }' |
        while read -r n; do node_of "$n"; done
}
consumers() {
    ctl list_queues name consumers | awk '$1 == "service_soma" { print $2 }'
}
# wait_consumers N SECONDS: until service_soma has N consumers.
wait_consumers() {
    local i got=''
    for ((i = 0; i < $2; i++)); do
        got=$(consumers 2>/dev/null)
        [[ $got == "$1" ]] && return 0
        sleep 1
    done
    echo "    service_soma: $got consumer(s), expected $1"
    return 1
}
# url_file_without N FILE: the services' address list without node N.
url_file_without() {
    (
        umask 077
        tr ',' '\n' <"$state/services.url" | sed -n "$1!p" | paste -sd, >"$2"
    )
}

# ------------------------------------------------------------ services
soma_args=(--queue-type quorum)
start_service soma1 SOMA "$MQRPC_BIN/service_soma" --url-file "$state/services.url" \
    "${soma_args[@]}" || exit 1
soma1=$SPAWNED_PID
node1=$(conn_nodes services | head -n 1)
# The second instance is kept off the first one's node.
url_file_without "$node1" "$tmpdir/services-others.url"
start_service soma2 SOMA "$MQRPC_BIN/service_soma" --url-file "$tmpdir/services-others.url" \
    "${soma_args[@]}" || exit 1
soma2=$SPAWNED_PID
mapfile -t snodes < <(conn_nodes services | sort -u)
say "soma instances on nodes ${snodes[*]}"
check "the two instances are connected to different nodes" test "${#snodes[@]}" -eq 2
check "service_soma is a quorum queue" \
    test "$(ctl list_queues name type | awk '$1 == "service_soma" { print $2 }')" = quorum
check "both instances consume" wait_consumers 2 10

# -------------------------------------------------------------- client
spawn chaos "$MQRPC_BIN/rpc_chaos" --url-file "$state/clients.url" --services soma \
    --connections 1 --inflight 8 --rate "$RATE" --retries 10 --timeout 20000 \
    --calls 1000000 --max-seconds 300 --report "$tmpdir/report.json" -v
chaos=$SPAWNED_PID
sleep 3

# kill_node N WHAT: SIGKILL node N, marked for rpc_chaos's gap figures.
kill_node() {
    say "SIGKILL node $1 ($2)"
    "$broker" kill "$1" || fail "broker.sh kill $1"
    kill -s RTMIN "$chaos"
}
restart_node() {
    sleep 5 # answers go on meanwhile, through the other nodes
    say "starting node $1 again"
    timeout 120 "$broker" start-node "$1" || fail "broker.sh start-node $1"
}

lead=$(leader)
if [[ -z $lead ]]; then
    fail "no leader for service_soma"
    lead=1
fi
kill_node "$lead" "leader of service_soma"
restart_node "$lead"
check "both instances consume once node $lead is back" wait_consumers 2 "$CONSUMERS_WAIT_S"

cnode=$(conn_nodes clients | head -n 1)
if [[ -z $cnode ]]; then
    fail "the client has no connection"
    cnode=2
fi
kill_node "$cnode" "the client's node"
restart_node "$cnode"
check "both instances consume once node $cnode is back" wait_consumers 2 "$CONSUMERS_WAIT_S"

# Calls after both restarts, then the client stops sending and drains.
sleep 3
kill -TERM "$chaos"
wait_pid "$chaos" 60
say "rpc_chaos (exit $WAIT_RC):"
grep -v '^rpc_chaos: [0-9]' "$tmpdir/chaos.out"
grep -v '^rpc_chaos: [0-9.]* s:' "$tmpdir/chaos.err" | head -n 20
check "no call lost, duplicated or answered wrongly (rpc_chaos exit 0)" test "$WAIT_RC" -eq 0
check "both kills were marked" grep -q '^node kill 2 ' "$tmpdir/chaos.out"
if grep -q 'had no correct answer after it' "$tmpdir/chaos.out"; then
    fail "answers did not resume after a node kill"
fi
while read -r gap; do
    check "answers resumed within ${GAP_LIMIT_S} s (${gap} s)" \
        awk -v g="$gap" -v l="$GAP_LIMIT_S" 'BEGIN { exit !(g <= l) }'
done < <(sed -n 's/^node kill [0-9]* at [0-9.]* s: answers resumed after \([0-9.]*\) s.*/\1/p' \
    "$tmpdir/chaos.out")
correct=$(sed -n 's/.*(correct \([0-9]*\), wrong.*/\1/p' "$tmpdir/chaos.out")
check "calls were answered (${correct:-0} correct)" test "${correct:-0}" -gt "$RATE"
check "soma instance 1 kept running" kill -0 "$soma1"
check "soma instance 2 kept running" kill -0 "$soma2"
finish
