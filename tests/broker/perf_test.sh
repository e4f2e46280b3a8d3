#!/usr/bin/env bash
# Broker test of the performance features as a user meets them: services
# with --workers and with --prefetch above 1 (batched replies and acks)
# answer every call exactly once; rpc_bench's output, its error accounting
# and exit codes; load spread over slow instances. Nothing here is timed:
# speed is measured by scripts/bench.sh, not asserted by tests.
# Needs the test broker (ctest fixture "broker") and the ctest environment.
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
tag=$$
section() { echo "--- $*"; }

# served NAME: the count in "stopped after answering N requests".
served() {
    sed -n 's/.*stopped after answering \([0-9]*\) requests.*/\1/p' \
        "$tmpdir/$1.err" | tail -n 1
}

# -------------------------------------------------------------- --workers
section "service_soma --workers 3: one process, three consumers"
q="service_t_${tag}_workers"
if start_service workers SOMA "$B/service_soma" --workers 3 --queue "$q"; then
    workers_pid=$SPAWNED_PID
    check "the ready line is printed once" \
        test "$(grep -c 'pronto' "$tmpdir/workers.out")" = 1
    wait_queue "$q" "0 3" 10
    check "three consumers on the queue" test $? = 0
    : >"$tmpdir/answered"
    for ((i = 0; i < 30; i++)); do
        rpc -v call "$q" '{"a": 1, "b": 2}'
        expect_rc 0
        sed -n 's/.*answered by \([^ ]*\) .*/\1/p' <<<"$ERR" >>"$tmpdir/answered"
    done
    # Prefetch 1 and one call at a time: strict round-robin over the three.
    for w in 1 2 3; do
        n=$(grep -c "^$q@.*:$workers_pid/$w\$" "$tmpdir/answered")
        check "worker $w answered 10 of 30 (got $n)" test "$n" = 10
    done
    stop_pid "$workers_pid"
    check "SIGTERM stops all workers with status 0 (got $STOP_RC)" \
        test "$STOP_RC" = 0
    check "the total counts every worker (got $(served workers))" \
        test "$(served workers)" = 30
fi
run "$B/service_soma" --workers 0
expect_rc 2
expect_err_line service_soma "--workers takes a number from 1 to 64, got \"0\""

# ---------------------------------------------------- prefetch 64, batched
section "service_soma --prefetch 64: batched replies and acks, exactly once"
q="service_t_${tag}_p64"
if start_service p64 SOMA "$B/service_soma" --prefetch 64 --queue "$q"; then
    p64_pid=$SPAWNED_PID
    run "$B/rpc_bench" --expect 3 --json -n 5000 -c 64 --warmup 200 \
        "$q" '{"a":1,"b":2}'
    expect_rc 0
    expect_json 'd["calls"] == 5000 and d["errors"] == 0'
    expect_json 'd["inflight"] == 64 and 0 < d["p50_us"] <= d["p99_us"] <= d["max_us"]'
    expect_json 'd["calls_per_s"] > 0 and d["rss_kib_end"] > 0'
    run "$B/rpc_bench" --expect 3 --json -n 3000 -c 16 --connections 3 \
        --warmup 100 "$q" '{"a":1,"b":2}'
    expect_rc 0
    expect_json 'd["calls"] == 3000 and d["connections"] == 3 and d["errors"] == 0'
    run "$B/rpc_bench" --expect 3 --json -n 500 -c 8 --warmup 0 \
        --direct-reply-to "$q" '{"a":1,"b":2}'
    expect_rc 0
    expect_json 'd["calls"] == 500 and d["errors"] == 0 and d["direct_reply_to"]'
    wait_queue "$q" "0 1" 10
    check "nothing left in the queue" test $? = 0
    stop_pid "$p64_pid"
    check "service stopped cleanly (got $STOP_RC)" test "$STOP_RC" = 0
    # 5200 + 3300 + 500 calls: each executed once, none redelivered.
    check "every request answered exactly once (got $(served p64))" \
        test "$(served p64)" = 9000
fi

# ---------------------------------------------------------- rpc_bench text
section "rpc_bench: text output, histogram, errors by kind, exit codes"
q="service_t_${tag}_bench"
if start_service bench SOMA "$B/service_soma" --queue "$q"; then
    run "$B/rpc_bench" --expect 3 -n 200 --warmup 10 \
        --hist "$tmpdir/hist.dat" "$q" '{"a":1,"b":2}'
    expect_rc 0
    expect_out_has "calls/s"
    expect_out_has "p99.9"
    expect_out_has "errors       none"
    # Not a terminal: no progress bar, nothing on stderr.
    check "no progress output when stderr is not a terminal" test -z "$ERR"
    check "histogram: cumulative fraction ends at 1" \
        test "$(tail -n 1 "$tmpdir/hist.dat" | awk '{print $3}')" = 1.000000
    check "histogram: counts add up to the calls" \
        test "$(awk '{s += $2} END {print s}' "$tmpdir/hist.dat")" = 200

    run "$B/rpc_bench" --expect 4 --json -n 20 --warmup 0 "$q" '{"a":1,"b":2}'
    expect_rc 1
    expect_json 'd["errors"] == 20 and d["errors_by_kind"] == {"wrong_result": 20}'
    run "$B/rpc_bench" --expect 4 -n 20 --warmup 0 "$q" '{"a":1,"b":2}'
    expect_rc 1
    expect_out_has "first error  unexpected result: 3"

    run "$B/rpc_bench" --json -n 10 --warmup 0 "$q" '{"a":"x","b":2}'
    expect_rc 1
    expect_json 'd["errors_by_kind"] == {"remote": 10}'
    stop_pid "$SPAWNED_PID"
fi
run "$B/rpc_bench" --json -n 10 --warmup 0 "service_t_${tag}_nobody" '{}'
expect_rc 1
expect_json 'd["errors_by_kind"] == {"no_route": 10}'
run "$B/rpc_bench" --url amqp://127.0.0.1:1/ -n 10
expect_rc 3
expect_err_has "rpc_bench: cannot connect to 127.0.0.1:1: connection refused"
for bad in "-c 0" "-n x" "--connections 513" "-d 0"; do
    # shellcheck disable=SC2086 # split on purpose
    run "$B/rpc_bench" $bad
    expect_rc 2
done
run "$B/rpc_bench" q '[1, 2]'
expect_rc 2
expect_err_line rpc_bench 'the request must be a JSON object, got "[1, 2]"'
run "$B/rpc_bench" --expect '{oops' q '{}'
expect_rc 2
expect_err_has "rpc_bench: --expect is not JSON"

# ------------------------------------------------- slow handler, balanced
section "service_work: slow requests spread over two instances"
q="service_t_${tag}_work"
w1='' w2=''
start_service work1 WORK "$B/service_work" --work-ms 20 --queue "$q" &&
    w1=$SPAWNED_PID
start_service work2 WORK "$B/service_work" --work-ms 20 --queue "$q" &&
    w2=$SPAWNED_PID
if [[ -n $w1 && -n $w2 ]]; then
    run "$B/rpc_bench" --expect '{"slept": 20}' --json -n 40 -c 4 \
        --warmup 0 "$q" '{}'
    expect_rc 0
    expect_json 'd["calls"] == 40 and d["errors"] == 0 and d["p50_us"] >= 20000'
    stop_pid "$w1"
    stop_pid "$w2"
    a=$(served work1)
    b=$(served work2)
    check "both instances worked (got $a and $b)" \
        test "${a:-0}" -gt 0 -a "${b:-0}" -gt 0
    check "40 requests in all (got $a + $b)" test $((a + b)) = 40
fi
run "$B/service_work" --work-ms -1
expect_rc 2
expect_err_line service_work '--work-ms takes a number from 0 to 600000, got "-1"'

finish
