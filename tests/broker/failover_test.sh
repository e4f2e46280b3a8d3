#!/usr/bin/env bash
# Broker test of address lists (issue 12) on the one test broker: a list
# whose first address is dead still connects, a malformed entry is refused
# naming its position, and a service and a client whose "node" goes (a TCP
# relay to the broker, killed) move to the next address of their list at
# once; calls in flight fail at once with connection_lost, or are re-sent
# when idempotent (rpc_bench --retries). A three-node kill test is
# broker.cluster's.
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
tag=$$
port=${MQRPC_BROKER_PORT:?}
# Ports near the broker's (the caller's range): relays and a dead one.
r0=$((port + 47)) r1=$((port + 48)) r2=$((port + 49)) dead=$((port + 50))
curl=$(broker_url clients)
surl=$(broker_url services)
# The port the URLs name: the TLS one on the TLS pass (amqps://), which the
# relays forward to.
bport=$(sed -E 's#^[a-z]+://[^@]*@[^:/]*:([0-9]+)/.*#\1#' <<<"$curl")
[[ $bport =~ ^[0-9]+$ ]] || bport=$port
# And its host: localhost on the TLS pass, the name the certificate holds.
bhost=$(sed -E 's#^[a-z]+://[^@]*@([^:/]*).*#\1#' <<<"$curl")
# The same URL on another port: "amqp://u:p@HOST:P/...".
at_port() { sed -E "s#@([^:/]*)(:[0-9]+)?/#@\1:$2/#" <<<"$1"; }
q="service_t_${tag}_fo"
trap 'delete_queues "$q" "$q.dlq"; cleanup' EXIT

section() { echo "--- $*"; }

# relay NAME PORT: a relay to the broker, for at most 60 s; RELAY_PID.
relay() {
    spawn "$1" "$PY" "$TESTS_DIR/tcp_relay.py" "$2" "$bport" 60
    RELAY_PID=$SPAWNED_PID
    wait_for_line "$tmpdir/$1.out" listening 5 || fail "relay $1 did not start"
}

section "a list whose first address is dead"
start_service fo SOMA "$B/service_soma" --queue "$q" \
    --url "$(at_port "$surl" "$dead"),$surl" || {
    finish
    exit 1
}
fo_pid=$SPAWNED_PID
ok "the service logs the address it connected to" \
    "grep -q 'connected.* to amqps\\?://services:\*\*\*\*@$bhost:$bport/' '$tmpdir/fo.err'"
# Each client draws its own order: over 8 runs both orders come up (all
# but certainly), and every run connects.
for i in 1 2 3 4 5 6 7 8; do
    AMQP_URL="$(at_port "$curl" "$dead"),$curl" rpc call "$q" '{"a": 1, "b": 2}'
    expect_rc 0
    expect_out 3
done
printf '%s,%s\n' "$(at_port "$curl" "$dead")" "$curl" >"$tmpdir/list.url"
chmod 600 "$tmpdir/list.url"
rpc --url-file "$tmpdir/list.url" call "$q" '{"a": 2, "b": 2}'
expect_rc 0
expect_out 4

section "malformed entries and dead lists"
AMQP_URL="$curl,amqp://u:secret@h:x/" rpc info
expect_rc 2
expect_err_line rpc_client 'AMQP_URL: entry 2 of 2: malformed broker URL "amqp://u:****@h:x/": port must be a decimal number'
ok "no password in the message" "[[ \$ERR != *secret* ]]"
rpc --url "amqp://127.0.0.1:$port/, amqp://h:x/" info
expect_rc 2
expect_err_line rpc_client '--url: entry 2 of 2: malformed broker URL "amqp://h:x/"' 
AMQP_URL="amqp://a/,http://b/,amqp://c/" run "$B/service_soma" --queue "$q"
expect_rc 2
expect_err_line service_soma 'AMQP_URL: entry 2 of 3: malformed broker URL "http://b/"'
printf '%s,,%s\n' "$curl" "$curl" >"$tmpdir/bad.url"
chmod 600 "$tmpdir/bad.url"
rpc --url-file "$tmpdir/bad.url" info
expect_rc 2
expect_err_line rpc_client "URL file $tmpdir/bad.url: entry 1 of 2:"
rpc --cacert /nonexistent.pem --url "amqps://h/,amqp://127.0.0.1:$port/" info
expect_rc 2
expect_err_line rpc_client '--url: entry 2 of 2: TLS options given for a plain amqp:// URL'
rpc --url "amqp://u:p@127.0.0.1:$dead/,amqp://u:p@127.0.0.1:$((dead + 1))/" info
expect_rc 3
expect_err_has "cannot connect to 127.0.0.1:$dead: connection refused"
expect_err_has "cannot connect to 127.0.0.1:$((dead + 1)): connection refused"

# Every password of a list typed into --url is hidden from ps.
spawn hide "$B/service_soma" --connect-timeout 3000 --queue "$q" \
    --url "amqp://u:secret1@127.0.0.1:$dead/,amqp://v:secret2@127.0.0.1:$((dead + 1))/"
sleep 0.5
args=$(tr '\0' ' ' </proc/$SPAWNED_PID/cmdline 2>/dev/null)
echo "ps shows: $args"
LABEL='--url with a list'
ok "no password of the list in ps" \
    "[[ \$args == *'u:*******@'*'v:*******@'* && \$args != *secret* ]]"
wait_pid "$SPAWNED_PID" 10

section "a service whose node goes moves to the next address at once"
stop_pid "$fo_pid"
relay ra "$r1"
ra_pid=$RELAY_PID
relay rb "$r2"
rb_pid=$RELAY_PID
start_service sv SOMA "$B/service_soma" --queue "$q" \
    --url "$(at_port "$surl" "$r1"),$(at_port "$surl" "$r2")" || {
    finish
    exit 1
}
sv_pid=$SPAWNED_PID
if grep -q "@$bhost:$r1/" "$tmpdir/sv.err"; then
    on=$ra_pid other=$r2
else
    on=$rb_pid other=$r1
fi
grep 'connected to' "$tmpdir/sv.err"
t0=$(now_ms)
kill -KILL "$on"
wait "$on" 2>/dev/null
forget "$on"
if wait_for_line "$tmpdir/sv.err" "connection regained" 5; then
    echo "regained after $(($(now_ms) - t0)) ms: $(grep 'connection regained' "$tmpdir/sv.err")"
    pass
else
    fail "the service did not reconnect within 5 s"
    cat "$tmpdir/sv.err"
fi
ok "to the other address, at the first attempt" \
    "grep -q 'connection regained after [0-9.]* s (1 attempt), to amqps\\?://services:\*\*\*\*@$bhost:$other/' '$tmpdir/sv.err'"
rpc call "$q" '{"a": 5, "b": 5}'
expect_rc 0
expect_out 10
# The client's part below needs the relays' ports, and a service of its
# own (straight to the broker) whose connections do not count there.
stop_pid "$sv_pid"
for pid in "$ra_pid" "$rb_pid"; do
    [[ $pid == "$on" ]] && continue
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    forget "$pid"
done
start_service sd SOMA "$B/service_soma" --queue "$q" || {
    finish
    exit 1
}

section "calls in flight when the client's node goes"
# One address: the reply queue lived on the node that went; the calls
# waiting on it fail at once (not at their 30 s timeout).
relay rc "$r0"
rc_pid=$RELAY_PID
spawn bench1 "$B/rpc_bench" --url "$(at_port "$curl" "$r0")" \
    --timeout 30000 -d 20 -c 8 --warmup 10 "$q" '{"a": 1, "b": 2}'
b1=$SPAWNED_PID
sleep 1.5
t0=$(now_ms)
kill -KILL "$rc_pid"
wait "$rc_pid" 2>/dev/null
forget "$rc_pid"
wait_pid "$b1" 10
echo "rpc_bench without --retries ended $(($(now_ms) - t0)) ms after the kill (rc $WAIT_RC)"
ok "it ends at once, with connection_lost errors" \
    "[[ $WAIT_RC == 1 && \$(($(now_ms) - t0)) -lt 5000 ]] && grep -q 'connection_lost' '$tmpdir/bench1.out'"
cat "$tmpdir/bench1.out"

# Idempotent calls with retries over a list of two relays: each relay is
# killed once (the second restarted first), so the client loses its node
# at least once and re-sends; every call is answered.
relay rd "$r1"
rd_pid=$RELAY_PID
relay rb2 "$r2"
rb_pid=$RELAY_PID
spawn bench2 "$B/rpc_bench" --retries 3 --timeout 10000 -d 5 -c 8 \
    --warmup 10 --url "$(at_port "$curl" "$r1"),$(at_port "$curl" "$r2")" \
    "$q" '{"a": 1, "b": 2}'
b2=$SPAWNED_PID
sleep 1.5
kill -KILL "$rd_pid"
wait "$rd_pid" 2>/dev/null
forget "$rd_pid"
relay re "$r1"
sleep 1.5
kill -KILL "$rb_pid"
wait "$rb_pid" 2>/dev/null
forget "$rb_pid"
wait_pid "$b2" 20
cat "$tmpdir/bench2.out" "$tmpdir/bench2.err"
accepts=$(cat "$tmpdir"/rd.out "$tmpdir"/re.out "$tmpdir"/rb2.out | grep -c accepted)
echo "connections through the relays: $accepts"
ok "rpc_bench --retries: every call answered across the lost node" \
    "[[ $WAIT_RC == 0 ]] && grep -q 'errors       none' '$tmpdir/bench2.out'"
ok "and it did reconnect" "(( accepts >= 2 ))"

finish
