#!/usr/bin/env bash
# The service runtime against the broker's own events: a consumer the
# broker cancels (queue deleted), a broker that blocks publishers (memory
# alarm), re-publishes and dead letters the broker refuses (a policy),
# deliveries handed back at a stop, replies of a batch that must not wait
# for a slow handler, and an instance id too long for AMQP. Queues are
# named service_svc_<pid>_*; the policies and the memory alarm set here are
# always undone at exit.
. "$(dirname "$0")/lib.sh"

broker=$MQRPC_SOURCE_DIR/scripts/broker.sh
B=$MQRPC_BIN
q=service_svc_$$
queues=()   # created here, deleted at exit
policies=() # set here, cleared at exit
alarm=0     # the memory alarm is on

on_exit() {
    ((alarm)) && "$broker" ctl -q set_vm_memory_high_watermark 0.4 >/dev/null 2>&1
    for p in "${policies[@]}"; do
        "$broker" ctl -q clear_policy "$p" >/dev/null 2>&1
    done
    cleanup
    delete_queues "${queues[@]}"
}
trap on_exit EXIT


# prefill QUEUE N JSON NAME: declares QUEUE with a service that stops at
# once, then spawns N callers (NAME1..NAMEn) whose requests wait in it.
prefill() {
    local queue=$1 n=$2 json=$3 name=$4 i
    start_service "${name}_decl" WORK "$B/service_work" --queue "$queue" || return 1
    stop_pid "$SPAWNED_PID"
    PIDS=()
    for ((i = 1; i <= n; i++)); do
        spawn "$name$i" "$B/rpc_client" -v --timeout 60000 call "$queue" "$json"
        PIDS+=("$SPAWNED_PID")
    done
    wait_queue "$queue" "$n 0" 20
}

# ------------------------------------------------ cancelled consumer
LABEL='delete_queue under a running service: it consumes again'
queues+=("$q.cancel" "$q.cancel.dlq")
start_service cancel SOMA "$B/service_soma" --queue "$q.cancel" || exit 1
cancel_pid=$SPAWNED_PID
t0=$(now_ms)
"$broker" ctl -q delete_queue "$q.cancel" >/dev/null
ok "the service says it consumes again" \
    "wait_for_line '$tmpdir/cancel.err' 'consuming $q.cancel again' 10"
echo "re-consumed $(($(now_ms) - t0)) ms after delete_queue was started (rabbitmqctl included): $(grep -o 'again after .*' "$tmpdir/cancel.err")"
rpc call "$q.cancel" '{"a": 2, "b": 3}'
expect_rc 0
expect_out 5
ok "one line says the consumer was cancelled" \
    "[[ \$(count_lines '$tmpdir/cancel.err' 'cancelled the consumer') == 1 ]]"
ok "no connection lost" "[[ \$(count_lines '$tmpdir/cancel.err' 'connection lost') == 0 ]]"
stop_pid "$cancel_pid"
ok "exits cleanly" "[[ $STOP_RC == 0 ]]"
ok "the stop line counts it" \
    "grep -q 'consumer cancelled 1 times' '$tmpdir/cancel.err'"

# ------------------------------------------------ flow control
# RabbitMQ 3.10 sends connection.blocked to a connection only once it
# publishes under an alarm, and a client's request published under the
# alarm waits in the broker: so the service holds a request when the alarm
# rises, and its reply is what gets it blocked.
LABEL='a memory alarm: the service says it is blocked, keeps its consumer, answers after'
queues+=("$q.blk" "$q.blk.dlq")
start_service blk WORK "$B/service_work" --queue "$q.blk" || exit 1
blk_pid=$SPAWNED_PID
spawn blk1 "$B/rpc_client" --timeout 60000 call "$q.blk" '{"ms": 4000}'
blk1=$SPAWNED_PID
sleep 0.5
alarm=1
"$broker" ctl -q set_vm_memory_high_watermark 0.0000001 >/dev/null
ok "the service logs the block" \
    "wait_for_line '$tmpdir/blk.err' 'the broker is blocking publishers: ' 15"
spawn blk2 "$B/rpc_client" --timeout 60000 call "$q.blk" '{"ms": 0}'
blk2=$SPAWNED_PID
sleep 1
ok "no answer while blocked" "kill -0 $blk1 2>/dev/null && kill -0 $blk2 2>/dev/null"
"$broker" ctl -q set_vm_memory_high_watermark 0.4 >/dev/null
alarm=0
t0=$(now_ms)
wait_pid "$blk1" 20
ok "the call in hand is answered after the alarm (exit $WAIT_RC)" \
    "[[ $WAIT_RC == 0 ]] && grep -q slept '$tmpdir/blk1.out'"
wait_pid "$blk2" 20
ok "the call sent under the alarm is answered (exit $WAIT_RC)" \
    "[[ $WAIT_RC == 0 ]] && grep -q slept '$tmpdir/blk2.out'"
echo "answered $(($(now_ms) - t0)) ms after the alarm was lifted"
ok "the service logs the unblock" \
    "wait_for_line '$tmpdir/blk.err' 'no longer blocks publishers' 5"
ok "one line each" "[[ \$(count_lines '$tmpdir/blk.err' 'blocking publishers') == 1 && \$(count_lines '$tmpdir/blk.err' 'no longer blocks') == 1 ]]"
ok "it kept its consumer" "wait_queue '$q.blk' '0 1' 5"
ok "and its connection" "[[ \$(count_lines '$tmpdir/blk.err' 'connection lost') == 0 ]]"
stop_pid "$blk_pid"
ok "the stop line counts it" "grep -q 'blocked by the broker 1 times' '$tmpdir/blk.err'"

# ------------------------------------------------ refused dead letter
LABEL='a dead letter the broker refuses: the caller gets an explicit error'
queues+=("$q.poison" "$q.poison.dlq")
policies+=("mqrpc_test_$$_dlq")
"$broker" ctl -q set_policy --apply-to queues "mqrpc_test_$$_dlq" \
    "^${q}\\.poison\\.dlq\$" '{"max-length": 0, "overflow": "reject-publish"}' >/dev/null
start_poison_supervisor "$q.poison" 1 4
wait_for_line "$tmpdir/poison.out" "pronto" 10
rpc --timeout 30000 call "$q.poison" '{"crash": true}'
expect_rc 1
expect_err_has "dead_letter"
expect_err_has "could not be kept"
ok "the service logged it" "grep -q 'refused it in $q.poison.dlq' '$tmpdir/poison.err'"
ok "nothing in the dead-letter queue" "wait_queue '$q.poison.dlq' '0 0' 5"
ok "nothing left in the queue" "wait_queue '$q.poison' '0 1' 5"
touch "$tmpdir/poison.stop"
kill -TERM "$(cat "$tmpdir/poison.pid")" 2>/dev/null
wait_pid "$SUPERVISOR_PID" 10
ok "the stop line counts it" "grep -q '1 refused by the broker' '$tmpdir/poison.err'"
"$broker" ctl -q clear_policy "mqrpc_test_$$_dlq" >/dev/null
policies=()

# ------------------------------------------------ hand-back at a stop
LABEL='a stop hands back unstarted deliveries: none counts as failed'
queues+=("$q.hand" "$q.hand.dlq")
prefill "$q.hand" 10 '{"ms": 1500}' hand || exit 1
callers=("${PIDS[@]}")
start_service h1 WORK "$B/service_work" -v --prefetch 10 --max-deliveries 1 \
    --queue "$q.hand" || exit 1
h1=$SPAWNED_PID
sleep 0.5 # the first request started; the other 9 are prefetched
stop_pid "$h1" 15
ok "the first instance exits cleanly" "[[ $STOP_RC == 0 ]]"
ok "it answered the one it had started and handed back 9" \
    "grep -q 'answering 1 requests.*9 handed back unstarted' '$tmpdir/h1.err'"
start_service h2 WORK "$B/service_work" -v --prefetch 10 --max-deliveries 1 \
    --queue "$q.hand" || exit 1
h2=$SPAWNED_PID
answered=0
for pid in "${callers[@]}"; do
    wait_pid "$pid" 30
    ((WAIT_RC == 0)) && answered=$((answered + 1))
done
ok "all 10 callers answered ($answered)" "((answered == 10))"
ok "no reply is dead_letter" "! grep -q dead_letter '$tmpdir'/hand[0-9]*.err"
stop_pid "$h2"
ok "the second instance answered 9, none redelivered or dead-lettered" \
    "grep -q 'answering 9 requests.*0 requeued after a redelivery, 0 dead-lettered' '$tmpdir/h2.err'"
ok "nothing in the dead-letter queue" "wait_queue '$q.hand.dlq' '0 0' 5"

# ------------------------------------------------ replies of a batch
# Three requests wait in the queue before the service starts, so that they
# arrive together and are served as one batch: 1 s of work, none, then 3 s.
# The reply to the second must leave before the third handler runs, not
# with the batch's ack (corked, Linux sent it after its 200 ms ceiling).
LABEL='--prefetch 3: a fast reply does not wait for the next slow handler'
queues+=("$q.batch" "$q.batch.dlq")
start_service b0 WORK "$B/service_work" --queue "$q.batch" || exit 1
stop_pid "$SPAWNED_PID"
n=0
for ms in 1000 0 3000; do
    n=$((n + 1))
    ( "$B/rpc_client" --timeout 30000 call "$q.batch" "{\"ms\": $ms}" \
        >"$tmpdir/batch$n.out" 2>&1 && now_ms >"$tmpdir/batch$n.at" ) </dev/null &
    spawned+=("$!")
    wait_queue "$q.batch" "$n 0" 10
done
start_service b1 WORK "$B/service_work" --prefetch 3 --queue "$q.batch" || exit 1
b1=$SPAWNED_PID
wait_for_line "$tmpdir/batch3.at" "" 15
at() { cat "$tmpdir/batch$1.at" 2>/dev/null || echo 0; }
first=$(at 1) fast=$(at 2) slow=$(at 3)
gap=$((fast > first ? fast - first : first - fast))
echo "replies: 1 s request at +0, fast one at +$((fast - first)) ms, 3 s one at +$((slow - first)) ms"
ok "all three answered" "((first && fast && slow))"
ok "the fast reply came with the first (${gap} ms apart), not after the cork ceiling" \
    "((gap < 100))"
ok "and well before the slow one ($((slow - fast)) ms later)" "((slow - fast >= 2500))"
stop_pid "$b1"

# ------------------------------------------------ a long instance id
LABEL='a 251-byte queue name: the default instance id is cut, calls answered'
# The longest name a service takes (251 bytes, room for ".dlq"): its
# default instance id "<queue>@<host>:<pid>" is longer than 255 bytes
# whatever the host name.
long=$(printf 'service_%s' "$(printf 'x%.0s' {1..243})")
queues+=("$long" "$long.dlq")
start_service long SOMA "$B/service_soma" --queue "$long" || exit 1
long_pid=$SPAWNED_PID
rpc -v call "$long" '{"a": 1, "b": 2}'
expect_rc 0
expect_out 3
app_id=$(sed -n 's/^answered by \(.*\) in [0-9.]* ms$/\1/p' <<<"$ERR")
ok "app_id is at most 255 bytes (${#app_id})" "((${#app_id} > 0 && ${#app_id} <= 255))"
stop_pid "$long_pid"

finish
