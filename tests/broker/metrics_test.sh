#!/usr/bin/env bash
# Prometheus metrics as an operator meets them: a service's --metrics
# endpoint passes promtool's checks, its counters move by exactly the calls
# made, bad --metrics values fail with one line and a documented exit code,
# rpc_bench --metrics-out prints the client's counters, and a real
# Prometheus server scrapes the service (and the broker's own
# rabbitmq_prometheus endpoint) and answers queries on both.
# HTTP ports: MQRPC_TEST_HTTP_PORT (the service), +1 (Prometheus).
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
P=${MQRPC_TEST_HTTP_PORT:-9464}
PROM_PORT=$((P + 1))
Q=service_t_metrics_$$
trap 'cleanup; delete_queues "$Q" "$Q.dlq"' EXIT

# scrape [PATH]: GET http://127.0.0.1:$P/metrics into OUT, RC (curl's).
scrape() {
    local label=$LABEL
    run curl -sS --max-time 5 "http://127.0.0.1:$P${1:-/metrics}"
    LABEL=$label
}

# value NAME{LABELS}: the sample's value in the last scrape (empty: none).
value() { printf '%s\n' "$OUT" | awk -v k="$1" '$1 == k { print $2 }'; }

expect_value() {
    local got
    got=$(value "$1")
    if [[ $got == "$2" ]]; then
        pass
    else
        fail "$LABEL: $1 should be $2, got '${got}'"
    fi
}

LABEL='--metrics before any request'
start_service soma SOMA "$B/service_soma" --queue "$Q" --workers 2 \
    --max-queue 50 --metrics "127.0.0.1:$P" || exit 1
scrape
expect_rc 0
printf '%s\n' "$OUT" >"$tmpdir/before.prom"
LABEL='promtool check metrics, before any request'
run promtool check metrics <"$tmpdir/before.prom"
expect_rc 0
ok "promtool check metrics says nothing (no lint problem)" '[[ -z $OUT && -z $ERR ]]'
OUT=$(cat "$tmpdir/before.prom")
LABEL='--metrics before any request'
expect_value "mqrpc_requests_total{queue=\"$Q\",code=\"ok\"}" 0
expect_value "mqrpc_request_handling_seconds_count{queue=\"$Q\"}" 0
expect_value "mqrpc_workers{queue=\"$Q\"}" 2
expect_value "mqrpc_connected{queue=\"$Q\"}" 2
expect_value "mqrpc_max_queue{queue=\"$Q\"}" 50
expect_value "mqrpc_build_info{version=\"$("$B/rpc_client" --version | awk '{print $NF}')\",program=\"service_soma\"}" 1

LABEL='counters after 5 ok and 3 bad_request calls'
for i in 1 2 3 4 5; do
    rpc call "$Q" "{\"a\": $i, \"b\": 1}"
    ((RC == 0)) || fail "call $i: rc $RC: $ERR"
done
for i in 1 2 3; do
    rpc call "$Q" '{"a": 1}'
    ((RC == 1)) || fail "bad call $i: rc $RC: $ERR"
done
LABEL='counters after 5 ok and 3 bad_request calls'
scrape
printf '%s\n' "$OUT" >"$tmpdir/after.prom"
expect_value "mqrpc_requests_total{queue=\"$Q\",code=\"ok\"}" 5
expect_value "mqrpc_requests_total{queue=\"$Q\",code=\"bad_request\"}" 3
expect_value "mqrpc_requests_total{queue=\"$Q\",code=\"internal\"}" 0
expect_value "mqrpc_request_handling_seconds_count{queue=\"$Q\"}" 8
expect_value "mqrpc_request_handling_seconds_bucket{queue=\"$Q\",le=\"+Inf\"}" 8
expect_value "mqrpc_requests_in_progress{queue=\"$Q\"}" 0
expect_value "mqrpc_requests_expired_total{queue=\"$Q\"}" 0
expect_value "mqrpc_connections_lost_total{queue=\"$Q\"}" 0
sum=$(value "mqrpc_request_handling_seconds_sum{queue=\"$Q\"}")
ok "handling time sum is a positive number of seconds below 8 ($sum)" \
    "awk -v s='$sum' 'BEGIN { exit !(s > 0 && s < 8) }'"
run promtool check metrics <"$tmpdir/after.prom"
expect_rc 0
ok "promtool check metrics says nothing" '[[ -z $OUT && -z $ERR ]]'

LABEL='only GET /metrics'
run curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P/"
expect_out 404
run curl -sS --max-time 5 -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$P/metrics"
expect_out 405
run curl -sS --max-time 5 -o /dev/null -w '%{content_type}' "http://127.0.0.1:$P/metrics"
expect_out 'text/plain; version=0.0.4; charset=utf-8'

# Bad values: one line, exit 2 for a malformed one, 6 when the port cannot
# be taken; both before connecting to the broker.
for bad in 9200 127.0.0.1 127.0.0.1: :9200 127.0.0.1:0 127.0.0.1:65536 \
    127.0.0.1:http ::1:9200; do
    LABEL="--metrics $bad"
    run "$B/service_soma" --queue "$Q" --metrics "$bad"
    expect_rc 2
    expect_err_line service_soma "--metrics takes HOST:PORT"
done
LABEL='--metrics on a port in use'
run "$B/service_soma" --queue "$Q" --metrics "127.0.0.1:$P"
expect_rc 6
expect_err_line service_soma "--metrics 127.0.0.1:$P: cannot listen: Address already in use"
LABEL='--metrics on an unknown host'
run "$B/service_soma" --queue "$Q" --metrics "no-such-host.invalid:$P"
expect_rc 6
expect_err_line service_soma "cannot resolve no-such-host.invalid"
LABEL='--metrics in --help'
run "$B/service_soma" --help
expect_out_has '--metrics HOST:PORT'

LABEL='rpc_bench --metrics-out -'
run "$B/rpc_bench" -n 20 --warmup 0 --metrics-out - "$Q" '{"a": 1, "b": 2}'
expect_rc 0
printf '%s\n' "$OUT" | sed -n '/^# HELP/,$p' >"$tmpdir/bench.prom"
OUT=$(cat "$tmpdir/bench.prom")
expect_value "mqrpc_client_calls_total{queue=\"$Q\",code=\"ok\"}" 20
expect_value "mqrpc_client_calls_total{queue=\"$Q\",code=\"timeout\"}" 0
expect_value "mqrpc_client_call_duration_seconds_count{queue=\"$Q\"}" 20
expect_value "mqrpc_client_calls_in_flight{queue=\"$Q\"}" 0
run promtool check metrics <"$tmpdir/bench.prom"
expect_rc 0
ok "promtool check metrics says nothing" '[[ -z $OUT && -z $ERR ]]'
LABEL='rpc_bench --metrics-out FILE'
run "$B/rpc_bench" -n 3 --warmup 0 --metrics-out "$tmpdir/bench2.prom" \
    "$Q" '{"a": 1}'
expect_rc 1 # every call failed with bad_request
OUT=$(cat "$tmpdir/bench2.prom")
expect_value "mqrpc_client_calls_total{queue=\"$Q\",code=\"bad_request\"}" 3
LABEL='rpc_bench --metrics-out to a directory that does not exist'
run "$B/rpc_bench" -n 1 --warmup 0 --metrics-out "$tmpdir/no/such.prom" \
    "$Q" '{"a": 1, "b": 2}'
expect_rc 6
expect_err_line rpc_bench "--metrics-out: cannot write $tmpdir/no/such.prom"

# The service's counters saw the bench's calls too: 5 + 20 + 1 ok.
LABEL='service counters after the benchmarks'
scrape
expect_value "mqrpc_requests_total{queue=\"$Q\",code=\"ok\"}" 26
expect_value "mqrpc_requests_total{queue=\"$Q\",code=\"bad_request\"}" 6

# A real Prometheus server scrapes the service and the broker.
LABEL='a Prometheus server scrapes the service'
rabbit_target=''
if [[ -s $MQRPC_STATE_DIR/prometheus_url ]]; then
    rabbit_target=$(sed -E 's|^http://([^/]*)/.*|\1|' "$MQRPC_STATE_DIR/prometheus_url")
fi
{
    echo 'global:'
    echo '  scrape_interval: 1s'
    echo 'scrape_configs:'
    echo '  - job_name: mqrpc'
    echo '    static_configs:'
    echo "      - targets: ['127.0.0.1:$P']"
    if [[ -n $rabbit_target ]]; then
        echo '  - job_name: rabbitmq'
        echo '    static_configs:'
        echo "      - targets: ['$rabbit_target']"
    fi
} >"$tmpdir/prometheus.yml"
run promtool check config "$tmpdir/prometheus.yml"
expect_rc 0
spawn prometheus prometheus --config.file "$tmpdir/prometheus.yml" \
    --web.listen-address "127.0.0.1:$PROM_PORT" \
    --storage.tsdb.path "$tmpdir/tsdb" --log.level warn
prom_pid=$SPAWNED_PID

# query EXPR: the first value of an instant query, or empty.
query() {
    curl -sS --max-time 5 -G "http://127.0.0.1:$PROM_PORT/api/v1/query" \
        --data-urlencode "query=$1" 2>/dev/null |
        "$PY" -c 'import json, sys
r = json.load(sys.stdin)["data"]["result"]
print(r[0]["value"][1] if r else "")' 2>/dev/null
}

# wait_query EXPR WANT SECONDS: until the query gives WANT.
wait_query() {
    local i got=''
    for ((i = 0; i < $3 * 4; i++)); do
        got=$(query "$1")
        [[ $got == "$2" ]] && return 0
        kill -0 "$prom_pid" 2>/dev/null || break
        sleep 0.25
    done
    echo "    $1 = '$got' (wanted $2)"
    return 1
}
check "Prometheus sees the service's target up" \
    wait_query "up{job=\"mqrpc\",instance=\"127.0.0.1:$P\"}" 1 30
check "Prometheus has mqrpc_requests_total of the service" \
    wait_query "mqrpc_requests_total{queue=\"$Q\",code=\"ok\"}" 26 10
check "Prometheus has the handling-time histogram" \
    wait_query "mqrpc_request_handling_seconds_count{queue=\"$Q\"}" 32 10
if [[ -n $rabbit_target ]]; then
    check "Prometheus sees the broker's rabbitmq_prometheus target up" \
        wait_query "up{job=\"rabbitmq\"}" 1 20
    # The broker refreshes its queue statistics every 5 s.
    check "RabbitMQ's own metrics count the service's 2 consumers" \
        wait_query "rabbitmq_queue_consumers{queue=\"$Q\"}" 2 20
else
    fail "the test broker has no prometheus_url (rabbitmq_prometheus off?)"
fi
kill -TERM "$prom_pid" 2>/dev/null
wait_pid "$prom_pid" 10 || fail "prometheus did not stop within 10 s"
forget "$prom_pid"

finish
