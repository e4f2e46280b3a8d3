#!/usr/bin/env bash
# Faults as a user meets them: each part breaks one thing on purpose and
# checks what the caller and the service's log show. The test broker is
# closed on, restarted and frozen (SIGSTOP) here, which is why broker tests
# hold a resource lock. Queues of this test are named service_rel_<pid>_*
# and deleted at the end.
. "$(dirname "$0")/lib.sh"

broker=$MQRPC_SOURCE_DIR/scripts/broker.sh
q=service_rel_$$
queues=()      # created here, deleted at exit
broker_pid=''  # set while the broker may be stopped with SIGSTOP

# Never leave the broker frozen or our queues behind, whatever happens.
on_exit() {
    [[ -n $broker_pid ]] && kill -CONT "$broker_pid" 2>/dev/null
    cleanup
    delete_queues "${queues[@]}"
}
trap on_exit EXIT

# close_connections USER: closes every connection of that account.
close_connections() {
    local pid user
    while IFS=$'\t' read -r pid user; do
        [[ $user == "$1" ]] || continue
        "$broker" ctl -q close_connection "$pid" "reliability test" >/dev/null
    done < <("$broker" ctl -q list_connections pid user 2>/dev/null)
}


# wait_count FILE TEXT N SECONDS: until FILE has N lines with TEXT.
wait_count() {
    local i
    for ((i = 0; i < $4 * 10; i++)); do
        (($(count_lines "$1" "$2") >= $3)) && return 0
        sleep 0.1
    done
    return 1
}

# ------------------------------------------------ a killed connection
LABEL='close_connection: the service logs it, reconnects and answers'
queues+=("$q.soma" "$q.soma.dlq")
start_service soma SOMA "$MQRPC_BIN/service_soma" --queue "$q.soma" || exit 1
soma_pid=$SPAWNED_PID
close_connections services
if wait_for_line "$tmpdir/soma.err" "connection regained" 10; then pass; else
    fail "no 'connection regained' line"
    show_last
fi
rpc call "$q.soma" '{"a": 2, "b": 3}'
expect_rc 0
expect_out 5
ok "one line lost, one regained" \
    "[[ \$(count_lines '$tmpdir/soma.err' 'connection lost') == 1 && \$(count_lines '$tmpdir/soma.err' 'connection regained') == 1 ]]"

LABEL='a call in flight fails at once with connection_lost (no retry: unknown queue)'
queues+=("$q.work" "$q.work.dlq")
start_service work WORK "$MQRPC_BIN/service_work" --queue "$q.work" || exit 1
work_pid=$SPAWNED_PID
spawn call1 "$MQRPC_BIN/rpc_client" --retries 3 --timeout 20000 \
    call "$q.work" '{"ms": 15000}'
call1=$SPAWNED_PID
# The service has the request (unacknowledged): only then is the client
# surely connected; a close during its connect would be another failure.
for ((i = 0; i < 20; i++)); do # rabbitmqctl takes a second or more
    [[ $("$broker" ctl -q list_queues name messages_unacknowledged 2>/dev/null |
        awk -v q="$q.work" '$1 == q {print $2}') == 1 ]] && break
    sleep 0.1
done
# rabbitmqctl alone takes 1-5 s on a busy machine: the work is long enough
# that an answer cannot be mistaken for the failure, and the clock starts
# once the broker has closed the connection.
close_connections clients
t0=$(now_ms)
wait_pid "$call1" 15
elapsed=$(($(now_ms) - t0))
ok "exit code 3 (broker)" "[[ $WAIT_RC == 3 ]]"
ok "failed ${elapsed} ms after the close, long before the 15 s of work" \
    "((elapsed < 3000))"
ok "says the connection was lost" \
    "grep -q 'connection lost' '$tmpdir/call1.err'"

LABEL='--retries re-sends an idempotent call after the connection is lost'
# service_work stands in for soma here, so that the call takes a while.
stop_pid "$work_pid" 1 # busy with the 15 s request nobody waits for
start_service work2 WORK "$MQRPC_BIN/service_work" --queue service_soma \
    --work-ms 2000 || exit 1
work_pid=$SPAWNED_PID
spawn call2 "$MQRPC_BIN/rpc_client" --retries 2 --timeout 20000 soma 1 2
call2=$SPAWNED_PID
sleep 1
close_connections clients
wait_pid "$call2" 15
ok "exit code 0" "[[ $WAIT_RC == 0 ]]"
ok "answered" "grep -q slept '$tmpdir/call2.out'"
stop_pid "$work_pid"

# ------------------------------------------------ heartbeats
LABEL='a frozen broker is noticed within two heartbeat intervals'
broker_pid=$("$broker" pid)
start_service hb SOMA "$MQRPC_BIN/service_soma" --heartbeat 2 || exit 1
hb_pid=$SPAWNED_PID
fifo=$tmpdir/menu.in
mkfifo "$fifo"
"$MQRPC_BIN/rpc_client" --heartbeat 2 <"$fifo" >"$tmpdir/menu.out" \
    2>"$tmpdir/menu.err" &
menu_pid=$!
spawned+=("$menu_pid")
exec 3>"$fifo"
wait_for_line "$tmpdir/menu.out" "Escolha" 10 || fail "the menu did not start"
sleep 1
kill -STOP "$broker_pid"
t0=$(now_ms)
wait_for_line "$tmpdir/hb.err" "connection lost" 10
svc_ms=$(($(now_ms) - t0))
wait_for_line "$tmpdir/menu.err" "reconnecting at the next call" 10
menu_ms=$(($(now_ms) - t0))
kill -CONT "$broker_pid"
broker_pid=''
echo "heartbeat 2 s: the service noticed the frozen broker after ${svc_ms} ms, the menu after ${menu_ms} ms"
# rabbitmq-c gives up 2 intervals (4 s) after the last frame it read, which
# came up to one interval before the freeze; 2 s more for slow machines.
ok "the service noticed after ${svc_ms} ms (heartbeat 2 s)" "((svc_ms <= 8000))"
ok "the menu noticed after ${menu_ms} ms (heartbeat 2 s)" "((menu_ms <= 8000))"
wait_for_line "$tmpdir/hb.err" "connection regained" 30 ||
    fail "the service did not reconnect after the broker thawed"
printf '1\n4\n5\n' >&3 # Soma 4 + 5 on the reconnected menu
wait_for_line "$tmpdir/menu.out" "Resultado: 9" 20 ||
    fail "the menu did not answer after reconnecting: $(tail -c 300 "$tmpdir/menu.err")"
pass
exec 3>&-
wait_pid "$menu_pid" 10
stop_pid "$hb_pid"

# ------------------------------------------------ durable requests
LABEL='--durable: a request waits for an instance, across a broker restart'
queues+=("$q.durable" "$q.durable.dlq")
start_service d1 SOMA "$MQRPC_BIN/service_soma" --durable --queue "$q.durable" || exit 1
stop_pid "$SPAWNED_PID" # the queue stays, with nobody consuming it
spawn dcall "$MQRPC_BIN/rpc_client" --durable --timeout 60000 \
    call "$q.durable" '{"a": 20, "b": 22}'
dcall=$SPAWNED_PID
wait_queue "$q.durable" "1 0" 10
"$broker" stop >"$tmpdir/restart.out" 2>&1 || fail "broker stop failed: $(cat "$tmpdir/restart.out")"
# A service started while the broker is down waits for it (one line), and
# gets ready once the broker is back.
queues+=("$q.early" "$q.early.dlq")
spawn early "$MQRPC_BIN/service_soma" --queue "$q.early"
early_pid=$SPAWNED_PID
ok "the early service says it is retrying" \
    "wait_for_line '$tmpdir/early.err' 'retrying' 10"
"$broker" start >>"$tmpdir/restart.out" 2>&1 || fail "broker start failed: $(cat "$tmpdir/restart.out")"
ok "the request survived the restart" "wait_queue '$q.durable' '1 0' 10"
start_service d2 SOMA "$MQRPC_BIN/service_soma" --durable --queue "$q.durable" || exit 1
d2_pid=$SPAWNED_PID
wait_pid "$dcall" 30
ok "the caller got its answer (exit $WAIT_RC)" "[[ $WAIT_RC == 0 ]]"
ok "answer 42" "grep -qx 42 '$tmpdir/dcall.out'"
# The services that were up through the restart came back by themselves.
ok "soma reconnected after the restart" \
    "wait_count '$tmpdir/soma.err' 'connection regained' 2 30"
rpc call "$q.soma" '{"a": 1, "b": 1}'
expect_out 2
# Without -v, a series of failed reconnection attempts says why once (and
# again only if the reason changes).
echo "soma's failed reconnection lines across the restart: $(count_lines "$tmpdir/soma.err" 'reconnection attempt')"
ok "soma logged the failed reconnection, once" \
    "[[ \$(count_lines '$tmpdir/soma.err' 'reconnection attempt 1 failed') == 1 && \$(count_lines '$tmpdir/soma.err' 'reconnection attempt') == 1 ]]"
stop_pid "$soma_pid"

LABEL='a service started while the broker was down: ready once it is back'
ok "it printed its ready line" \
    "wait_for_line '$tmpdir/early.out' '[x] Serviço SOMA pronto...' 30"
rpc call "$q.early" '{"a": 20, "b": 1}'
expect_rc 0
expect_out 21
ok "one retrying line" "[[ \$(count_lines '$tmpdir/early.err' 'retrying') == 1 ]]"
ok "and one connected line" "grep -q 'connected after' '$tmpdir/early.err'"
stop_pid "$early_pid"

LABEL='instances must agree on --durable'
run "$MQRPC_BIN/service_soma" --queue "$q.durable"
expect_rc 2
expect_err_has "exists with other settings"
stop_pid "$d2_pid"

# ------------------------------------------------ SIGKILL mid-request
LABEL='SIGKILL mid-request: another instance answers, once'
queues+=("$q.kill" "$q.kill.dlq")
start_service k1 WORK "$MQRPC_BIN/service_work" --queue "$q.kill" || exit 1
k1=$SPAWNED_PID
spawn kcall "$MQRPC_BIN/rpc_client" -v --timeout 20000 call "$q.kill" '{"ms": 3000}'
kcall=$SPAWNED_PID
sleep 1
kill -KILL "$k1"
wait_pid "$k1" 5
start_service k2 WORK "$MQRPC_BIN/service_work" -v --queue "$q.kill" || exit 1
k2=$SPAWNED_PID
wait_pid "$kcall" 15
ok "answered (exit $WAIT_RC)" "[[ $WAIT_RC == 0 ]] && grep -q slept '$tmpdir/kcall.out'"
ok "by the second instance" "grep -q 'answered by $q.kill@.*:$k2 ' '$tmpdir/kcall.err'"
ok "which saw a redelivery" "grep -q 'redelivered (1 failed deliveries)' '$tmpdir/k2.err'"
stop_pid "$k2"

# ------------------------------------------------ poison message
LABEL='a poison message is dead-lettered after --max-deliveries'
queues+=("$q.poison" "$q.poison.dlq")
start_poison_supervisor "$q.poison" 3 8
wait_for_line "$tmpdir/poison.out" "pronto" 10
rpc --timeout 30000 call "$q.poison" '{"crash": true}'
expect_rc 1
expect_err_has "dead_letter"
expect_err_has "$q.poison.dlq"
ok "it is in the dead-letter queue" "wait_queue '$q.poison.dlq' '1 0' 5"
ok "the instances died 3 times" \
    "[[ \$(count_lines '$tmpdir/poison.out' 'pronto') == 4 ]]"
rpc call "$q.poison" '{}'
expect_rc 0
expect_out_has '"pid"'
touch "$tmpdir/poison.stop"
kill -TERM "$(cat "$tmpdir/poison.pid")" 2>/dev/null
wait_pid "$SUPERVISOR_PID" 10

# ------------------------------------------------ deadlines
LABEL='a request past its deadline is skipped, not run'
queues+=("$q.late" "$q.late.dlq")
start_service late WORK "$MQRPC_BIN/service_work" -v --prefetch 2 --queue "$q.late" || exit 1
late_pid=$SPAWNED_PID
spawn busy "$MQRPC_BIN/rpc_client" --timeout 10000 call "$q.late" '{"ms": 3000}'
sleep 1
rpc --timeout 300 call "$q.late" '{"ms": 5000}'
expect_rc 4
wait_pid "$SPAWNED_PID" 10
ok "the service says it skipped it" \
    "wait_for_line '$tmpdir/late.err' 'past its deadline' 5"
ok "and never ran it" "[[ \$(count_lines '$tmpdir/late.err' 'answered ') == 1 ]]"
stop_pid "$late_pid"

ok "stop line counts it" "grep -q '1 skipped past their deadline' '$tmpdir/late.err'"

# ------------------------------------------------ back-pressure
LABEL='--max-queue: a full queue gives an immediate overloaded error'
queues+=("$q.full" "$q.full.dlq")
start_service full WORK "$MQRPC_BIN/service_work" --max-queue 2 --queue "$q.full" || exit 1
full_pid=$SPAWNED_PID
spawn f1 "$MQRPC_BIN/rpc_client" --timeout 20000 call "$q.full" '{"ms": 4000}'
f1=$SPAWNED_PID
sleep 1
spawn f2 "$MQRPC_BIN/rpc_client" --timeout 20000 call "$q.full" '{"ms": 0}'
f2=$SPAWNED_PID
spawn f3 "$MQRPC_BIN/rpc_client" --timeout 20000 call "$q.full" '{"ms": 0}'
f3=$SPAWNED_PID
wait_queue "$q.full" "2 1" 5
rpc --timeout 20000 call "$q.full" '{"ms": 0}'
expect_rc 7
expect_err_has "overloaded"
ok "at once (${ELAPSED_MS} ms)" "((ELAPSED_MS < 1500))"
for pid in "$f1" "$f2" "$f3"; do
    wait_pid "$pid" 15
    ok "the queued calls are answered" "[[ $WAIT_RC == 0 ]]"
done
run "$MQRPC_BIN/service_work" --queue "$q.full"
expect_rc 2
expect_err_has "every instance must use the same --durable, --max-queue"
stop_pid "$full_pid"

# ------------------------------------------------ malformed messages
LABEL='malformed messages: bad_request or logged and acked, never stuck'
start_service bad SOMA "$MQRPC_BIN/service_soma" --queue "$q.soma" || exit 1
bad_pid=$SPAWNED_PID
run "$PY" "$TESTS_DIR/malformed.py" "$q.soma"
expect_rc 0
for want in "no_correlation_id none" "wrong_content_type error bad_request" \
    "json_with_charset ok -" "huge_headers ok -" \
    "deadline_not_integer error bad_request" "invalid_utf8 error bad_request" \
    "deep_nesting error bad_request" "not_an_object error bad_request" \
    "not_json error bad_request" "empty_body error bad_request"; do
    ok "$want" "grep -qx '$want' <<<\"\$OUT\""
done
ok "no reply to nothing" "! grep -q unexpected <<<\"\$OUT\""
ok "the service logged the one it could not answer" \
    "grep -q 'request without correlation_id' '$tmpdir/bad.err'"
ok "nothing left in the queue" "wait_queue '$q.soma' '0 1' 5"
rpc call "$q.soma" '{"a": 1, "b": 2}'
expect_out 3
stop_pid "$bad_pid"
ok "the service exits cleanly" "[[ $STOP_RC == 0 ]]"

# ------------------------------------------------ quorum queues
# The key cases again on --queue-type quorum (a quorum queue works on one
# node): answers, a poison message through the broker's delivery count,
# deadlines and expiration, --max-queue, and instances that disagree.
qq=$q.qq
queues+=("$qq.a" "$qq.a.dlq" "$qq.poison" "$qq.poison.dlq" "$qq.late"
    "$qq.late.dlq" "$qq.full" "$qq.full.dlq")

LABEL='quorum: answers'
start_service qa SOMA "$MQRPC_BIN/service_soma" --queue-type quorum --queue "$qq.a" || exit 1
qa_pid=$SPAWNED_PID
rpc call "$qq.a" '{"a": 2, "b": 40}'
expect_rc 0
expect_out 42
ok "the queue is a durable quorum queue" \
    "'$broker' ctl -q list_queues name type durable arguments 2>/dev/null | grep -F '$qq.a	quorum	true' | grep -q 'x-delivery-limit'"

LABEL='quorum: instances that disagree'
run "$MQRPC_BIN/service_soma" --queue "$qq.a"
expect_rc 2
expect_err_has "exists with other settings"
expect_err_has "--queue-type"
run "$MQRPC_BIN/service_soma" --queue-type quorum --max-deliveries 9 --queue "$qq.a"
expect_rc 2
expect_err_has "inequivalent arg 'x-delivery-limit'"
stop_pid "$qa_pid"
# and the other way round: a quorum instance on a classic queue
start_service qc SOMA "$MQRPC_BIN/service_soma" --queue "$q.classic" || exit 1
queues+=("$q.classic" "$q.classic.dlq")
run "$MQRPC_BIN/service_soma" --queue-type quorum --queue "$q.classic"
expect_rc 2
expect_err_has "exists with other settings"
stop_pid "$SPAWNED_PID"

LABEL='quorum: a poison message is dead-lettered through x-delivery-count'
rm -f "$tmpdir/poison.stop" # the classic case's
: >"$tmpdir/poison.out"
start_poison_supervisor "$qq.poison" 3 8 --queue-type quorum
wait_for_line "$tmpdir/poison.out" "pronto" 10
rpc --timeout 30000 call "$qq.poison" '{"crash": true}'
expect_rc 1
expect_err_has "dead_letter"
expect_err_has "$qq.poison.dlq"
ok "it is in the dead-letter queue" "wait_queue '$qq.poison.dlq' '1 0' 5"
ok "the instances died 3 times" \
    "[[ \$(count_lines '$tmpdir/poison.out' 'pronto') == 4 ]]"
ok "the broker counted the deliveries" \
    "grep -q 'after 3 deliveries' '$tmpdir/poison.err'"
rpc call "$qq.poison" '{}'
expect_rc 0
expect_out_has '"pid"'
touch "$tmpdir/poison.stop"
kill -TERM "$(cat "$tmpdir/poison.pid")" 2>/dev/null
wait_pid "$SUPERVISOR_PID" 10

LABEL='quorum: a request past its deadline is skipped; one that expires in the queue goes'
start_service qlate WORK "$MQRPC_BIN/service_work" -v --prefetch 2 --queue-type quorum --queue "$qq.late" || exit 1
qlate_pid=$SPAWNED_PID
spawn qbusy "$MQRPC_BIN/rpc_client" --timeout 10000 call "$qq.late" '{"ms": 3000}'
sleep 1
rpc --timeout 300 call "$qq.late" '{"ms": 5000}'
expect_rc 4
wait_pid "$SPAWNED_PID" 10
ok "the service says it skipped it" \
    "wait_for_line '$tmpdir/qlate.err' 'past its deadline' 5"
ok "and never ran it" "[[ \$(count_lines '$tmpdir/qlate.err' 'answered ') == 1 ]]"
stop_pid "$qlate_pid"
# No instance: the broker expires the request (per-message expiration);
# a quorum queue dead-letters it, with the reason.
rpc --timeout 300 call "$qq.late" '{"ms": 0}'
expect_rc 4
ok "the broker expired it: the queue is empty" "wait_queue '$qq.late' '0 0' 5"
ok "and it is in the dead-letter queue" "wait_queue '$qq.late.dlq' '1 0' 5"

LABEL='quorum: --max-queue gives an immediate overloaded error'
start_service qfull WORK "$MQRPC_BIN/service_work" --max-queue 2 --queue-type quorum --queue "$qq.full" || exit 1
qfull_pid=$SPAWNED_PID
spawn qf1 "$MQRPC_BIN/rpc_client" --timeout 20000 call "$qq.full" '{"ms": 4000}'
qf1=$SPAWNED_PID
sleep 1
spawn qf2 "$MQRPC_BIN/rpc_client" --timeout 20000 call "$qq.full" '{"ms": 0}'
qf2=$SPAWNED_PID
spawn qf3 "$MQRPC_BIN/rpc_client" --timeout 20000 call "$qq.full" '{"ms": 0}'
qf3=$SPAWNED_PID
wait_queue "$qq.full" "2 1" 5
# A quorum queue learns it is full just after the publish that fills it:
# one more request may get in, the next ones are refused.
spawn qf4 "$MQRPC_BIN/rpc_client" --timeout 20000 call "$qq.full" '{"ms": 0}'
qf4=$SPAWNED_PID
sleep 0.5
rpc --timeout 20000 call "$qq.full" '{"ms": 0}'
expect_rc 7
expect_err_has "overloaded"
# A quorum queue confirms (and refuses) after a Raft round: slower than a
# classic queue on a busy machine, still far from the 20 s timeout.
ok "at once (${ELAPSED_MS} ms)" "((ELAPSED_MS < 3000))"
for pid in "$qf1" "$qf2" "$qf3"; do
    wait_pid "$pid" 15
    ok "the queued calls are answered" "[[ $WAIT_RC == 0 ]]"
done
wait_pid "$qf4" 15
ok "the one over the limit was answered or refused ($WAIT_RC)" \
    "[[ $WAIT_RC == 0 || $WAIT_RC == 7 ]]"
stop_pid "$qfull_pid"

finish
