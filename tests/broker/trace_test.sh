#!/usr/bin/env bash
# W3C trace context and structured logs, as a user meets them: rpc_client
# --traceparent gets a reply in the same trace with the service's own span,
# the service's log line for the request names both, a pika caller's trace
# is continued, a request without one starts one, a chain through
# service_resumo keeps one trace id, and --log-format json writes JSON lines
# with the documented fields and no password. Runs on the fixed queues
# service_soma, service_media and service_resumo.
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
trap 'cleanup; delete_queues service_resumo service_resumo.dlq service_trace_probe' EXIT

TRACE=4bf92f3577b34da6a3ce929d0e0e4736
PARENT=00f067aa0ba902b7
TP=00-$TRACE-$PARENT-01

# pika_call QUEUE JSON [TRACEPARENT [TRACESTATE]]: a pika caller, as the
# OpenTelemetry pika instrumentation sends (string headers); prints the
# reply's headers and body as one JSON object.
pika_call() {
    run "$PY" - "$@" <<'EOF'
import json, sys, time, uuid
import pika, mqrpc_pika
queue, body = sys.argv[1], sys.argv[2]
headers = {}
if len(sys.argv) > 3:
    headers["traceparent"] = sys.argv[3]
if len(sys.argv) > 4:
    headers["tracestate"] = sys.argv[4]
conn = mqrpc_pika.connect("clients")
ch = conn.channel()
q = ch.queue_declare(queue="", exclusive=True).method.queue
corr = str(uuid.uuid4())
ch.basic_publish(exchange="", routing_key=queue, body=body,
                 properties=pika.BasicProperties(
                     reply_to=q, correlation_id=corr,
                     headers=headers or None))
deadline = time.time() + 10
while time.time() < deadline:
    m, props, b = ch.basic_get(q, auto_ack=True)
    if m and props.correlation_id == corr:
        h = {k: (v.decode() if isinstance(v, bytes) else v)
             for k, v in (props.headers or {}).items()}
        print(json.dumps({"headers": h, "body": json.loads(b)}))
        sys.exit(0)
    time.sleep(0.02)
sys.exit(4)
EOF
}

LABEL='bad --log-format'
run "$B/service_soma" --log-format xml
expect_rc 2
expect_err_line service_soma '--log-format takes text or json, got "xml"'

LABEL='bad --traceparent'
for bad in 00-$TRACE-$PARENT 00-00000000000000000000000000000000-$PARENT-01 \
    00-$TRACE-0000000000000000-01 ff-$TRACE-$PARENT-01 \
    00-${TRACE^^}-$PARENT-01 "$TP-extra"; do
    rpc --traceparent "$bad" soma 1 2
    expect_rc 2
    expect_err_line rpc_client '--traceparent: not a W3C traceparent'
done
rpc --tracestate a=b soma 1 2
expect_rc 2
expect_err_line rpc_client '--tracestate needs --traceparent'

start_service soma SOMA "$B/service_soma" -v || exit 1
soma_pid=$SPAWNED_PID
start_service media MEDIA "$B/service_media" --log-format json -v || exit 1
media_pid=$SPAWNED_PID

LABEL='rpc_client --traceparent'
rpc -v --traceparent "$TP" --tracestate 'congo=t61rcWkgMzE' soma 1 2
expect_rc 0
expect_out 3
# "traceparent SENT, reply traceparent REPLY"
reply_tp=$(sed -n 's/^traceparent .*, reply traceparent \(00-[0-9a-f-]*\)$/\1/p' \
    <<<"$ERR")
ok "-v shows the traceparent sent ($ERR)" "[[ \$ERR == *'traceparent $TP, reply'* ]]"
ok "the reply is in the same trace ($reply_tp)" "[[ $reply_tp == 00-$TRACE-????????????????-01 ]]"
span=${reply_tp:36:16}
ok "with the service's own span id ($span)" \
    "[[ ${#span} == 16 && $span != $PARENT && $span != 0000000000000000 ]]"
wait_for_line "$tmpdir/soma.err" "span_id=$span" 5
ok "the service's log line names the trace and its span" \
    "grep -q 'answered .*trace_id=$TRACE span_id=$span' '$tmpdir/soma.err'"

LABEL='a pika caller with a traceparent'
pika_call service_soma '{"a": 2, "b": 3}' "$TP" 'congo=t61rcWkgMzE'
expect_rc 0
expect_json 'd["body"] == 5 and d["headers"]["traceparent"].startswith("00-'$TRACE'-") and d["headers"]["traceparent"].endswith("-01") and d["headers"]["traceparent"][36:52] not in ("'$PARENT'", "'$span'") and d["headers"]["tracestate"] == "congo=t61rcWkgMzE"'
pika_span=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["headers"]["traceparent"][36:52])' "$OUT" 2>/dev/null)
wait_for_line "$tmpdir/soma.err" "span_id=$pika_span" 5
ok "the service logs the pika caller's trace with its span" \
    "grep -q 'trace_id=$TRACE span_id=$pika_span' '$tmpdir/soma.err'"

LABEL='a pika caller without a traceparent (the seed client)'
pika_call service_soma '{"a": 2, "b": 3}'
expect_rc 0
expect_json 'd["body"] == 5 and len(d["headers"]["traceparent"]) == 55 and d["headers"]["traceparent"][3:35] != "'$TRACE'" and "tracestate" not in d["headers"]'

LABEL='a pika caller with an invalid traceparent'
pika_call service_soma '{"a": 2, "b": 3}' "00-${TRACE^^}-$PARENT-01"
expect_rc 0
expect_json 'd["body"] == 5 and d["headers"]["traceparent"][3:35] not in ("'$TRACE'", "'${TRACE^^}'")'

LABEL='the request on the wire (a pika reader)'
"$PY" - <<'EOF' >/dev/null 2>&1
import mqrpc_pika
conn = mqrpc_pika.connect("services")
conn.channel().queue_declare(queue="service_trace_probe")
conn.close()
EOF
spawn probe "$B/rpc_client" --timeout 5000 --traceparent "$TP" \
    --tracestate 'congo=t61rcWkgMzE' call service_trace_probe '{}'
probe_pid=$SPAWNED_PID
run "$PY" - <<'EOF'
import json, sys, time
import mqrpc_pika
conn = mqrpc_pika.connect("services")
ch = conn.channel()
deadline = time.time() + 5
while time.time() < deadline:
    m, props, b = ch.basic_get("service_trace_probe", auto_ack=True)
    if m:
        print(json.dumps({k: (v.decode() if isinstance(v, bytes) else v)
                          for k, v in props.headers.items()}))
        sys.exit(0)
    time.sleep(0.02)
sys.exit(4)
EOF
expect_rc 0
expect_json 'd["traceparent"] == "'$TP'" and d["tracestate"] == "congo=t61rcWkgMzE"'
stop_pid "$probe_pid"

LABEL='a chain through service_resumo'
start_service resumo RESUMO "$B/service_resumo" -v || exit 1
resumo_pid=$SPAWNED_PID
T2=0af7651916cd43dd8448eb211c80319c
rpc -v --traceparent "00-$T2-b7ad6b7169203331-01" call service_resumo \
    '{"numeros": [1, 2, 3, 4]}'
expect_rc 0
expect_json 'd == {"quantidade": 4, "soma": 10, "media": 2.5}'
resumo_span=$(sed -n 's/^traceparent .*, reply traceparent 00-[0-9a-f]*-\([0-9a-f]*\)-01$/\1/p' <<<"$ERR")
wait_for_line "$tmpdir/resumo.err" "span_id=$resumo_span" 5
ok "service_resumo logs the caller's trace with its span" \
    "grep -q 'answered .*trace_id=$T2 span_id=$resumo_span' '$tmpdir/resumo.err'"
wait_for_line "$tmpdir/media.err" "$T2" 5
ok "service_soma's lines for resumo's calls are in the same trace" \
    "[[ \$(grep -c 'answered .*trace_id=$T2 ' '$tmpdir/soma.err') -ge 2 ]]"
ok "service_media's line too" \
    "grep -q '\"trace_id\":\"$T2\"' '$tmpdir/media.err'"
ok "with spans of their own" \
    "! grep 'trace_id=$T2' '$tmpdir/soma.err' | grep -q 'span_id=$resumo_span'"

LABEL='--log-format json'
rpc --traceparent "$TP" media 1 2 3
expect_rc 0
rpc call service_media '{"numeros": "x"}'
expect_rc 1
stop_pid "$media_pid"
ok "service_media stops cleanly" "[[ $STOP_RC == 0 ]]"
run "$PY" - "$tmpdir/media.err" "$TRACE" "$(broker_url services)" <<'EOF'
import json, re, sys
path, trace, url = sys.argv[1:4]
password = re.match(r"amqps?://[^:]*:([^@]*)@", url).group(1)
lines = open(path).read().splitlines()
assert lines, "no log lines"
recs = [json.loads(l) for l in lines]          # every line is JSON
for r in recs:
    assert {"ts", "level", "instance", "msg"} <= r.keys(), r
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"]), r
    assert r["level"] in ("error", "warn", "info", "debug"), r
    assert r["instance"].startswith("service_media@"), r
assert password and password not in open(path).read(), "a password in the log"
req = [r for r in recs if r["msg"].startswith("answered")]
keys = {"queue", "correlation_id", "trace_id", "span_id", "duration_ms", "code"}
for r in req:
    assert keys <= r.keys(), r
    assert r["queue"] == "service_media", r
    assert re.fullmatch(r"[0-9a-f]{32}", r["trace_id"]), r
    assert re.fullmatch(r"[0-9a-f]{16}", r["span_id"]), r
    assert isinstance(r["duration_ms"], (int, float)) and r["duration_ms"] >= 0, r
ok = [r for r in req if r["trace_id"] == trace]
assert len(ok) == 1 and ok[0]["code"] == "ok", req
assert any(r["code"] == "bad_request" for r in req), req
assert recs[-1]["msg"].startswith("stopped after answering"), recs[-1]
print(len(recs), "lines,", len(req), "about requests")
EOF
expect_rc 0
[[ $RC == 0 ]] || cat "$tmpdir/media.err"

stop_pid "$resumo_pid"
stop_pid "$soma_pid"
ok "service_soma stops cleanly" "[[ $STOP_RC == 0 ]]"
finish
