#!/usr/bin/env bash
# Health and discovery over the broker, as an operator meets them:
# rpc_client ping, services and health against two service_soma instances
# and one service_media (queues service_t_<pid>_*), a pika seed service
# (no control queue), an instance killed with SIGKILL, one busy, one
# stopping. Other tests may run instances on the same broker at the same
# time: broadcast output is filtered by this test's queue names.
# Needs the test broker (ctest fixture "broker") and the ctest environment.
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
tag=$$
soma=service_t_${tag}_soma
media=service_t_${tag}_media
seedq=service_t_${tag}_seed
work=service_t_${tag}_work
none=service_t_${tag}_none
curl_=$(broker_url clients)
hostport=${curl_#*@}
hostport=${hostport%%/*}
cpass=$(sed -E 's#^amqps?://[^:]+:([^@]*)@.*#\1#' <<<"$curl_")
spass=$(sed -E 's#^amqps?://[^:]+:([^@]*)@.*#\1#' <<<"$(broker_url services)")
on_exit() {
    cleanup
    delete_queues "$soma" "$soma.dlq" "$media" "$media.dlq" "$seedq" \
        "$work" "$work.dlq"
}
trap on_exit EXIT
section() { echo "--- $*"; }
# ours FILTER: the lines of OUT about this test's queues.
ours() { grep -E -- "queue=service_t_${tag}_$1" <<<"$OUT" || true; }
nlines() { if [[ -z $1 ]]; then echo 0; else wc -l <<<"$1"; fi; }
# control_queue_exists NAME: a passive declare (pika, services account);
# another connection's exclusive queue answers 405 RESOURCE_LOCKED, a
# deleted one 404 NOT_FOUND.
control_queue_exists() {
    "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, pika, mqrpc_pika
conn = mqrpc_pika.connect("services")
try:
    conn.channel().queue_declare(queue=sys.argv[1], passive=True)
except pika.exceptions.ChannelClosedByBroker as e:
    sys.exit(1 if e.reply_code == 404 else 0)
conn.close()
EOF
}

section "no instance: health fails with one line"
rpc health "$none"
expect_rc 4
expect_err_line rpc_client "$none: no instance answered within 1000 ms (no such queue)"
if ((ELAPSED_MS >= 1000 && ELAPSED_MS < 3000)); then pass; else
    fail "health waited $ELAPSED_MS ms, expected its 1000 ms default"; fi
rpc --timeout 300 ping "$none"
expect_rc 4
expect_err_line rpc_client "no instance of $none answered within 300 ms"
expect_out_empty

start_service soma1 SOMA "$B/service_soma" --queue "$soma" || exit 1
soma1=$SPAWNED_PID
start_service soma2 SOMA "$B/service_soma" --queue "$soma" || exit 1
soma2=$SPAWNED_PID
start_service media MEDIA "$B/service_media" --queue "$media" || exit 1
media1=$SPAWNED_PID
host=$(hostname)

section "ping: one line per live instance, with its fields"
rpc ping
expect_rc 0
mine=$(ours '(soma|media) ')
LABEL="rpc_client ping (broadcast), lines of this test's 3 instances"
if [[ $(nlines "$mine") == 3 ]]; then pass; else fail "$LABEL: expected 3, got: [$mine]"; show_last; fi
for pid in "$soma1" "$soma2" "$media1"; do
    line=$(grep -F " pid=$pid " <<<"$mine")
    LABEL="ping line of pid $pid"
    ok "instance, host, version, uptime, counters, consuming, broker" \
        '[[ $line =~ ^service_t_${tag}_(soma|media)@$host:$pid\ queue=service_t_${tag}_(soma|media)\ host=$host\ pid=$pid\ version=[0-9]+\.[0-9]+\.[0-9]+\ uptime=[0-9]+\.[0-9]s\ served=0\ in_progress=0\ consuming=yes\ blocked=no\ broker=$hostport\ cluster=.+$ ]]'
done
if [[ $OUT == *"$cpass"* || $OUT == *"$spass"* ]]; then fail "a password in ping output"; else pass; fi

rpc ping "$soma"
expect_rc 0
LABEL="rpc_client ping $soma"
ok "2 lines, the two soma instances" \
    '[[ $(nlines "$OUT") == 2 && $OUT == *" pid=$soma1 "* && $OUT == *" pid=$soma2 "* ]]'

section "ping --json: one JSON object per line"
rpc call "$soma" '{"a": 1, "b": 2}'
expect_out 3
rpc --json ping "$soma"
expect_rc 0
LABEL="rpc_client --json ping $soma"
if "$PY" - "$OUT" "$soma" "$soma1" "$soma2" "$hostport" <<'EOF'; then pass; else fail "$LABEL: JSON lines"; show_last; fi
import json, sys
out, q, p1, p2, hp = sys.argv[1:]
rows = [json.loads(l) for l in out.splitlines()]
assert len(rows) == 2, rows
assert sorted(r["pid"] for r in rows) == sorted([int(p1), int(p2)])
for r in rows:
    assert r["queue"] == q and r["instance"] == "%s@%s:%d" % (q, r["host"], r["pid"])
    assert isinstance(r["uptime_ms"], int) and r["uptime_ms"] >= 0
    assert r["consuming"] is True and r["blocked"] is False
    assert r["in_progress"] == 0 and r["broker"] == hp
    assert r["control_queue"].startswith("mqrpc.control." + q + ".")
assert sum(r["served"] for r in rows) == 1, rows  # the one call above
EOF
ctl_soma1=$("$PY" -c '
import json, sys
for l in sys.argv[1].splitlines():
    r = json.loads(l)
    if r["pid"] == int(sys.argv[2]): print(r["control_queue"])' "$OUT" "$soma1")

section "services: queues, live instances, the broker's consumers"
rpc services
expect_rc 0
LABEL="rpc_client services"
ok "soma: 2 instances, 2 consumers" '[[ $OUT == *"$soma instances=2 consumers=2 waiting=0"$'"'\n'"'* ]]'
ok "media: 1 instance, 1 consumer" '[[ $OUT == *"$media instances=1 consumers=1 waiting=0"$'"'\n'"'* ]]'
ok "instance lines under their queue" '[[ $(grep -c "^  service_t_${tag}_soma@" <<<"$OUT") == 2 ]]'
rpc --json services
expect_rc 0
LABEL="rpc_client --json services"
if "$PY" - "$OUT" "$soma" "$media" <<'EOF'; then pass; else fail "$LABEL: JSON lines"; show_last; fi
import json, sys
rows = {r["queue"]: r for r in map(json.loads, sys.argv[1].splitlines())}
s, m = rows[sys.argv[2]], rows[sys.argv[3]]
assert s["exists"] and s["consumers"] == 2 and len(s["instances"]) == 2, s
assert m["exists"] and m["consumers"] == 1 and len(m["instances"]) == 1, m
EOF

section "health: exit 0 while an instance answers and consumes"
rpc health "$soma"
expect_rc 0
expect_out "$soma: healthy: 2 instances answered within 1000 ms, 2 consuming"

section "a pika seed service: a consumer without a live mqrpc instance"
if start_service seed SOMA "$PY" "$TESTS_DIR/seed_service.py" "$soma"; then
    seed1=$SPAWNED_PID
    rpc services
    LABEL="rpc_client services with the seed on $soma"
    ok "3 consumers, 2 instances" '[[ $OUT == *"$soma instances=2 consumers=3 waiting=0 (1 consumer without a live mqrpc instance)"* ]]'
    stop_pid "$seed1"
fi
if start_service seed2 SOMA "$PY" "$TESTS_DIR/seed_service.py" "$seedq"; then
    seed2=$SPAWNED_PID
    rpc services "$seedq"
    expect_rc 0
    LABEL="rpc_client services $seedq (only the seed consumes it)"
    ok "named queue: no instance, 1 consumer" '[[ $OUT == *"$seedq instances=0 consumers=1 waiting=0 (1 consumer without a live mqrpc instance)"* ]]'
    rpc health "$seedq"
    expect_rc 4
    expect_err_line rpc_client "$seedq: no instance answered within 1000 ms (the broker counts 1 consumer, 0 requests waiting)"
    stop_pid "$seed2"
fi

section "an instance killed (SIGKILL): its control queue goes with it"
LABEL="control queue of soma1 before the kill"
ok "exists" 'control_queue_exists "$ctl_soma1"'
kill -KILL "$soma1"
wait_pid "$soma1" 5
gone=0
for ((i = 0; i < 50; i++)); do
    control_queue_exists "$ctl_soma1" || { gone=1; break; }
    sleep 0.1
done
LABEL="control queue $ctl_soma1 after SIGKILL"
ok "deleted by the broker" '((gone))'
rpc ping "$soma"
expect_rc 0
LABEL="rpc_client ping $soma after the kill"
ok "one line, soma2" '[[ $(nlines "$OUT") == 1 && $OUT == *" pid=$soma2 "* ]]'
rpc ping
LABEL="rpc_client ping (broadcast) after the kill"
ok "2 lines of this test" '[[ $(nlines "$(ours "(soma|media) ")") == 2 ]]'

section "busy handlers: the connection thread still answers"
if start_service work WORK "$B/service_work" --queue "$work" --threads 2; then
    work1=$SPAWNED_PID
    "$B/rpc_client" --timeout 20000 call "$work" '{"ms": 4000}' >/dev/null 2>&1 &
    busy1=$!
    "$B/rpc_client" --timeout 20000 call "$work" '{"cpu_ms": 4000}' >/dev/null 2>&1 &
    busy2=$!
    spawned+=("$busy1" "$busy2")
    sleep 0.7
    # Both handler threads are taken: the answer comes from the
    # connection thread, well within 300 ms.
    rpc --timeout 300 ping "$work"
    expect_rc 0
    expect_out_has "in_progress=2 consuming=yes"
    # A stop waits for the handlers (one spins, deaf to cancellation):
    # meanwhile the instance answers but no longer consumes its queue.
    kill -TERM "$work1"
    sleep 0.5
    rpc health "$work"
    expect_rc 5
    expect_err_line rpc_client "$work: not consuming: 1 instance answered, none consumes the queue"
    wait_pid "$work1" 15
    wait_pid "$busy1" 15
    wait_pid "$busy2" 15
fi

section "a broker that blocks publishers (memory alarm): health says blocked"
broker=$MQRPC_SOURCE_DIR/scripts/broker.sh
alarm() { "$broker" ctl -q set_vm_memory_high_watermark "$1" >/dev/null; }
# alarm_is on|off: waits (up to 20 s) for the memory monitor to agree.
alarm_is() {
    local i a
    for ((i = 0; i < 100; i++)); do
        a=$("$broker" ctl -q eval 'rabbit_alarm:get_alarms().' 2>/dev/null)
        if [[ $a == *memory* ]]; then [[ $1 == on ]] && return 0
        else [[ $1 == off ]] && return 0; fi
        sleep 0.2
    done
    return 1
}
# The next tests must not find the broker in alarm.
trap 'alarm 0.4; on_exit' EXIT
alarm 0.0000001
if alarm_is on; then
    rpc health "$soma"
    expect_rc 8
    expect_err_line rpc_client "$soma: blocked: the broker is blocking publishers: low on memory"
else
    fail "the memory alarm did not go on"
fi
alarm 0.4
if alarm_is off; then pass; else fail "the memory alarm did not clear"; fi
trap on_exit EXIT

section "usage"
rpc health
expect_rc 2
expect_err_line rpc_client "health takes one queue: health QUEUE (try --help)"
rpc ping a b
expect_rc 2
expect_err_line rpc_client "ping takes at most one queue"
finish
