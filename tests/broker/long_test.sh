#!/usr/bin/env bash
# Services that do real work: a handler that runs for several heartbeat
# intervals (answered once, no connection lost), handler threads on one
# connection, progress replies (and a pika caller that never asked for
# them), a handler that stops when its caller gives up, what a stop does to
# requests in hand, and the broker's consumer_timeout. Queues are named
# service_long_<pid>_*; the consumer_timeout lowered here is restored at exit.
. "$(dirname "$0")/lib.sh"

broker=$MQRPC_SOURCE_DIR/scripts/broker.sh
B=$MQRPC_BIN
q=service_long_$$
queues=()        # created here, deleted at exit
short_timeout=0  # the broker's consumer_timeout is lowered

# The broker's values before the test, as "TICK TIMEOUT".
broker_env() {
    "$broker" ctl -q eval '{ok, T} = application:get_env(rabbit, channel_tick_interval), {ok, C} = application:get_env(rabbit, consumer_timeout), io:format("~b ~b~n", [T, C]).' | head -1
}
saved_env=''
restore_consumer_timeout() {
    [[ -n $saved_env ]] || return 0
    local tick=${saved_env% *} timeout=${saved_env#* }
    # Set back, not unset: a channel cannot open without the tick interval.
    "$broker" ctl -q eval "application:set_env(rabbit, channel_tick_interval, $tick), application:set_env(rabbit, consumer_timeout, $timeout)." >/dev/null 2>&1
    short_timeout=0
}

on_exit() {
    ((short_timeout)) && restore_consumer_timeout
    cleanup
    delete_queues "${queues[@]}"
}
trap on_exit EXIT

# ------------------------------------------------ a handler of 6 heartbeats
LABEL='a 6 s handler under a 1 s heartbeat'
queues+=("$q.long" "$q.long.dlq")
start_service long WORK "$B/service_work" -v --heartbeat 1 --queue "$q.long" || exit 1
long_pid=$SPAWNED_PID
rpc --heartbeat 1 --timeout 20000 call "$q.long" '{"ms": 6000}'
expect_rc 0
expect_out '{"slept": 6000}'
ok "it ran once" "[[ \$(count_lines '$tmpdir/long.err' 'answered') == 1 ]]"
ok "no connection was lost" \
    "[[ \$(count_lines '$tmpdir/long.err' 'connection lost') == 0 ]]"
stop_pid "$long_pid"
ok "exits cleanly" "[[ $STOP_RC == 0 ]]"
ok "its stop line counts one answer and no lost connection" \
    "grep -q 'answering 1 requests.*connection lost 0 times' '$tmpdir/long.err'"

# ------------------------------------------------ handler threads
LABEL='--threads 4: four 3 s requests at once on one connection'
queues+=("$q.threads" "$q.threads.dlq")
start_service threads WORK "$B/service_work" --threads 4 --queue "$q.threads" || exit 1
threads_pid=$SPAWNED_PID
ok "one consumer" "wait_queue '$q.threads' '0 1' 5"
t0=$(now_ms)
PIDS=()
for i in 1 2 3 4; do
    spawn "t$i" "$B/rpc_client" --timeout 20000 call "$q.threads" '{"ms": 3000}'
    PIDS+=("$SPAWNED_PID")
done
for i in 1 2 3 4; do
    wait_pid "${PIDS[i - 1]}" 20
    ok "call $i answered" "[[ $WAIT_RC == 0 ]] && grep -qF '{\"slept\": 3000}' '$tmpdir/t$i.out'"
done
elapsed=$(($(now_ms) - t0))
echo "four 3 s calls on --threads 4 took $elapsed ms (one after the other: 12000)"
ok "they ran at once (well under 12 s)" "((elapsed < 9000))"
stop_pid "$threads_pid"
ok "exits cleanly" "[[ $STOP_RC == 0 ]]"

# ------------------------------------------------ progress
LABEL='progress replies'
queues+=("$q.progress" "$q.progress.dlq")
start_service progress WORK "$B/service_work" --queue "$q.progress" || exit 1
progress_pid=$SPAWNED_PID
rpc --timeout 10000 call "$q.progress" '{"ms": 1000}'
expect_rc 0
ok "without -v or a terminal, rpc_client asks for none" "[[ -z \$ERR ]]"
rpc -v --timeout 10000 call "$q.progress" '{"ms": 1000}'
expect_rc 0
expect_out '{"slept": 1000}'
ok "with -v it shows progress lines (not a terminal)" \
    "[[ \$(grep -c '^progress: [0-9]*% slept' '$tmpdir/last.err') -ge 5 ]]"
ok "in order, before the result" \
    "grep '^progress:' '$tmpdir/last.err' | sort -t' ' -k2 -n -c"
LABEL='progress on a terminal'
run script -qefc "$B/rpc_client --timeout 10000 call $q.progress '{\"ms\": 1000}'" /dev/null
expect_rc 0
ok "a bar redrawn in place, then the result" \
    "grep -q \$'\\r\\[##########..........\\]  50% slept 500 of 1000 ms' <<<\"\$OUT\" && grep -qF '{\"slept\": 1000}' <<<\"\$OUT\""
# The seed's pika client asks for no progress: it must get the reply alone.
LABEL='a pika caller that never asked for progress'
run "$PY" - "$q.progress" <<'EOF'
import json, sys, time, uuid
import pika, mqrpc_pika
conn = mqrpc_pika.connect("clients")
ch = conn.channel()
reply = ch.queue_declare(queue="", exclusive=True).method.queue
corr = str(uuid.uuid4())
ch.basic_publish(exchange="", routing_key=sys.argv[1], body=b'{"ms": 1000}',
                 properties=pika.BasicProperties(reply_to=reply,
                                                 correlation_id=corr))
got = []
end = time.time() + 4
while time.time() < end:
    method, props, body = ch.basic_get(reply, auto_ack=True)
    if method:
        got.append((props.correlation_id, json.loads(body)))
    else:
        time.sleep(0.05)
print(len(got), got[0][1] if got else None, got[0][0] == corr if got else None)
EOF
expect_rc 0
expect_out "1 {'slept': 1000} True"
stop_pid "$progress_pid"

# ------------------------------------------------ a caller that gives up
LABEL='a caller that gives up after 1 s of a 20 s request'
queues+=("$q.giveup" "$q.giveup.dlq")
start_service giveup WORK "$B/service_work" -v --queue "$q.giveup" || exit 1
giveup_pid=$SPAWNED_PID
rpc --timeout 1000 call "$q.giveup" '{"ms": 20000}'
expect_rc 4
# One handler thread: answered in time only if the handler stopped early.
rpc --timeout 5000 call "$q.giveup" '{"ms": 1}'
expect_rc 0
expect_out '{"slept": 1}'
ok "the handler stopped early" \
    "wait_for_line '$tmpdir/giveup.err' 'stopped after' 2"
ok "its reply was not sent" \
    "wait_for_line '$tmpdir/giveup.err' 'reply not sent, its caller gave up' 2"
stop_pid "$giveup_pid"
ok "the stop line counts it" \
    "grep -q '1 not sent as their callers had given up' '$tmpdir/giveup.err'"

# ------------------------------------------------ stopping with work in hand
LABEL='SIGTERM with a request in hand'
queues+=("$q.stop" "$q.stop.dlq")
start_service stop WORK "$B/service_work" --queue "$q.stop" || exit 1
stop_svc=$SPAWNED_PID
spawn stopcall "$B/rpc_client" --timeout 20000 call "$q.stop" '{"ms": 2000}'
stopcall_pid=$SPAWNED_PID
sleep 0.5
kill -TERM "$stop_svc"
wait_pid "$stopcall_pid" 10
ok "the request in hand is still answered" \
    "[[ $WAIT_RC == 0 ]] && grep -qF '{\"slept\": 2000}' '$tmpdir/stopcall.out'"
wait_pid "$stop_svc" 10
ok "then the service exits cleanly" "[[ $WAIT_RC == 0 ]]"

LABEL='a second SIGTERM stops at once'
start_service stop2 WORK "$B/service_work" --queue "$q.stop" || exit 1
stop_svc=$SPAWNED_PID
spawn stopcall2 "$B/rpc_client" --timeout 30000 call "$q.stop" '{"ms": 20000}'
stopcall_pid=$SPAWNED_PID
sleep 0.5
kill -TERM "$stop_svc"
sleep 0.5
ok "the first waits for the handler" "kill -0 $stop_svc"
kill -TERM "$stop_svc"
wait_pid "$stop_svc" 5
ok "the second exits at once with 128+SIGTERM" "[[ $WAIT_RC == 143 ]]"
ok "it says so" "grep -q 'stopping now' '$tmpdir/stop2.err'"
ok "the request is back in the queue" "wait_queue '$q.stop' '1 0' 5"
kill -TERM "$stopcall_pid" 2>/dev/null
wait_pid "$stopcall_pid" 5

# ------------------------------------------------ the broker's consumer_timeout
LABEL="the broker's consumer_timeout"
queues+=("$q.ctimeout" "$q.ctimeout.dlq")
# consumer_timeout is read by each new channel: lowered for this service's
# only. channel_tick_interval is how often channels check (RabbitMQ's own
# tests lower it the same way), read at each check: restored after the call.
saved_env=$(broker_env)
ok "the broker's consumer_timeout is set (scripts/broker.sh: 30 min)" \
    "[[ '$saved_env' =~ ^[0-9]+\ 1800000$ ]]"
short_timeout=1
"$broker" ctl -q eval 'application:set_env(rabbit, consumer_timeout, 1500), application:set_env(rabbit, channel_tick_interval, 250).' >/dev/null
start_service ctimeout WORK "$B/service_work" --queue "$q.ctimeout" || exit 1
ctimeout_pid=$SPAWNED_PID
"$broker" ctl -q eval "application:set_env(rabbit, consumer_timeout, ${saved_env#* })." >/dev/null
rpc --timeout 8000 call "$q.ctimeout" '{"ms": 3000}'
restore_consumer_timeout
ok "the service names the cause in one line" \
    "wait_for_line '$tmpdir/ctimeout.err' 'longer than its consumer_timeout' 5"
ok "only one line says so" \
    "[[ \$(count_lines '$tmpdir/ctimeout.err' 'consumer_timeout') == 1 ]]"
echo "caller: rc $RC, $OUT $ERR"
echo "service: $(grep -m1 consumer_timeout "$tmpdir/ctimeout.err")"
ok "the caller still gets its answer (sent on the new connection)" \
    "[[ $RC == 0 && \$OUT == '{\"slept\": 3000}' ]]"
kill -TERM "$ctimeout_pid"
kill -TERM "$ctimeout_pid"
wait_pid "$ctimeout_pid" 5

finish
