#!/usr/bin/env bash
# Open-loop load as a user sees it (rpc_bench --rate): one service_work
# instance (5 ms of work a call, prefetch 1) can answer at most 200 calls/s;
# the test measures what it answers here and now, then offers half and
# twice that. At half, a call takes about the work time; at twice, requests
# queue up, the achieved rate stays at the service's capacity and the
# latency (counted from each call's scheduled start) grows with the
# backlog, the longer the overload the worse. Thresholds are wide ratios,
# not speeds: this runs on a shared 2-core machine. Also: the
# in-flight cap shows as errors, bad --rate values are refused, and the bare
# rabbitmq-c floor prints the same fields. Queues of this test are named
# service_load_<pid>_* and deleted at the end. About 20 s.
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
q=service_load_$$
queues=("${q}_work" "${q}_bare")
on_exit() {
    cleanup
    delete_queues "${queues[@]}"
}
trap on_exit EXIT
section() { echo "--- $*"; }

# row JSON_LINES RATE FIELD: FIELD of the row offered RATE calls/s.
row() {
    "$PY" -c '
import json, sys
for line in sys.argv[1].splitlines():
    d = json.loads(line)
    if d["rate"] == float(sys.argv[2]):
        print(d[sys.argv[3]])' "$1" "$2" "$3"
}

# ------------------------------------------------- under and over capacity
section "service_work (5 ms, one instance): half and twice its capacity"
work=(--expect '{"slept": 5}' --timeout 30000 --warmup 5 "${q}_work" '{}')
if start_service work WORK "$B/service_work" --work-ms 5 --queue "${q}_work"; then
    # Its capacity here and now (at most 200 calls/s, less on a busy
    # machine): a closed loop that always keeps a request waiting for it.
    run "$B/rpc_bench" --json -n 100 -c 4 "${work[@]}"
    expect_rc 0
    cap=$("$PY" -c 'import json, sys; print(int(json.loads(sys.argv[1])["calls_per_s"]))' "$OUT" 2>/dev/null)
    cap=${cap:-0}
    ok "capacity about 1 / 5 ms or less ($cap calls/s)" \
        '(( cap >= 20 && cap <= 210 ))'
    half=$((cap / 2)) twice=$((cap * 2))
    ((half > 0)) || half=1
    ((twice > 0)) || twice=2
    # Half, then twice the capacity, 2 s each; one JSON line each.
    run "$B/rpc_bench" --json --rate "$half,$twice" -d 2 "${work[@]}"
    expect_rc 0
    sweep=$OUT
    ok "two rows" '[[ $(wc -l <<<"$sweep") == 2 ]]'
    # The overload once more, half as long.
    run "$B/rpc_bench" --json --rate "$twice" -d 1 "${work[@]}"
    expect_rc 0
    short=$OUT
    if [[ $(wc -l <<<"$sweep") == 2 && -n $short ]]; then
        h_calls=$(row "$sweep" "$half" calls)
        h_ach=$(row "$sweep" "$half" achieved_per_s)
        h_p50=$(row "$sweep" "$half" p50_us)
        h_p99=$(row "$sweep" "$half" p99_us)
        o_calls=$(row "$sweep" "$twice" calls)
        o_err=$(row "$sweep" "$twice" errors)
        o_ach=$(row "$sweep" "$twice" achieved_per_s)
        o_p50=$(row "$sweep" "$twice" p50_us)
        o_p99=$(row "$sweep" "$twice" p99_us)
        s_p99=$(row "$short" "$twice" p99_us)
        echo "    capacity $cap calls/s; offered $half: $h_ach calls/s," \
            "p50 $h_p50 us, p99 $h_p99 us; offered $twice: $o_ach calls/s," \
            "p50 $o_p50 us, p99 $o_p99 us (1 s of it: p99 $s_p99 us)"
        ok "half capacity: every call of the 2 s schedule answered ($h_calls)" \
            '[[ $h_calls == $((half * 2)) ]]'
        ok "half capacity: achieved about the offered $half calls/s ($h_ach)" \
            '(( ${h_ach%.*} * 10 >= half * 8 && ${h_ach%.*} * 10 <= half * 12 ))'
        ok "half capacity: p50 at least the 5 ms of work ($h_p50 us)" \
            '(( h_p50 >= 5000 ))'
        ok "half capacity: p99 near the work time, under 150 ms ($h_p99 us)" \
            '(( h_p99 < 150000 ))'
        ok "twice capacity: every call answered, late ($o_calls, $o_err errors)" \
            '[[ $o_calls == $((twice * 2)) && $o_err == 0 ]]'
        # The service cannot go faster than its capacity: the schedule's
        # rate is not achieved, whatever the client does.
        ok "twice capacity: achieved about the capacity, not the offered $twice ($o_ach)" \
            '(( ${o_ach%.*} * 2 >= cap && ${o_ach%.*} * 4 <= cap * 6 ))'
        ok "twice capacity: p99 far above the work time ($o_p99 us > 250 ms)" \
            '(( o_p99 > 250000 ))'
        ok "twice capacity: p99 over 5x the p99 at half ($o_p99 vs $h_p99 us)" \
            '(( o_p99 > 5 * h_p99 ))'
        ok "the backlog grows: 2 s of overload, p99 over 1.4x that of 1 s ($o_p99 vs $s_p99 us)" \
            '(( o_p99 * 10 > 14 * s_p99 ))'
    fi

    # -c caps the calls in flight: a due call finding it reached is an
    # error the row shows, not a quiet delay. 300 calls due in 0.3 s, at
    # most 2 in flight, each at least 5 ms: most are never sent.
    run "$B/rpc_bench" --json --rate 1000 -n 300 -c 2 "${work[@]}"
    expect_rc 1
    expect_json 'd["errors_by_kind"].get("inflight_limit", 0) > 100 and d["errors"] + d["calls"] == d["scheduled"] == 300 and d["inflight"] == 2'
    run "$B/rpc_bench" --rate 1000 -n 300 -c 2 "${work[@]}"
    expect_rc 1
    expect_out_has "offered/s"
    expect_out_has "inflight_limit"
    expect_out_has "first error  2 calls in flight on a connection (-c)"
    stop_pid "$SPAWNED_PID"
fi

# ------------------------------------------------------------ bad values
section "--rate: usage errors"
for bad in 0 -5 abc 100, ,100 1e9 100,,200 100x; do
    run "$B/rpc_bench" --rate "$bad" -d 1
    expect_rc 2
    expect_err_line rpc_bench "--rate takes calls/s above 0 and up to 10000000, separated by commas (e.g. 1000,2000,4000), got \"$bad\""
done
run "$B/rpc_bench" --rate 10,20 --hist "$tmpdir/h.dat" -d 1
expect_rc 2
expect_err_line rpc_bench "--hist writes one run's histogram: give --rate one rate"
run "$B/rpc_bench" --connections 513
expect_rc 2
run "$B/rpc_bench" --help
expect_rc 0
expect_out_has "--rate R[,R...]"

# --------------------------------------------------- the floor, same fields
section "bare_pingpong call --rate: the same row fields"
spawn bare env "AMQP_URL=$(broker_url services)" "$B/bare_pingpong" serve \
    --queue "${q}_bare"
if wait_for_line "$tmpdir/bare.out" ready; then
    bare_pid=$SPAWNED_PID
    run env "AMQP_URL=$(broker_url clients)" "$B/bare_pingpong" call \
        --queue "${q}_bare" --connections 3 --warmup 10 --rate 200,400 -d 1
    expect_rc 0
    fields='["impl", "connections", "inflight", "rate", "offered_per_s", "scheduled", "calls", "seconds", "calls_per_s", "achieved_per_s", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "errors", "errors_by_kind"]'
    first=$(head -n 1 <<<"$OUT")
    OUT=$first
    expect_json "all(k in d for k in $fields) and d[\"rate\"] == 200 and d[\"connections\"] == 3 and d[\"calls\"] == 200 and d[\"errors\"] == 0"
    run env "AMQP_URL=$(broker_url clients)" "$B/bare_pingpong" call \
        --queue "${q}_bare" --connections 4 -c 1 --warmup 10 -n 400
    expect_rc 0
    expect_json 'd["connections"] == 4 and d["calls"] == 400 and d["p50_us"] <= d["p999_us"] <= d["max_us"]'
    run "$B/bare_pingpong" call --rate 0
    expect_rc 2
    expect_err_has "--rate takes calls/s above 0"
    stop_pid "$bare_pid"
else
    fail "bare_pingpong serve did not get ready"
fi

finish
