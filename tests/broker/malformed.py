"""Sends malformed requests to a service queue and prints what came back.

Usage: malformed.py QUEUE. Each case is published with pika, which lets us
set any property; one line per case is printed after 5 s of collecting:
"CASE TYPE CODE" for a reply (TYPE "ok" or "error", CODE the error code or
"-"), or "CASE none" when no reply came (the service logged and acked it).
"""
import json
import sys
import time

import pika

import mqrpc_pika

queue = sys.argv[1]
conn = mqrpc_pika.connect("clients")
ch = conn.channel()
reply_q = ch.queue_declare(queue="", exclusive=True).method.queue
replies = {}


def on_reply(_ch, _method, props, body):
    code = "-"
    kind = "error" if props.type == "error" else "ok"
    if kind == "error":
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "?"
    replies[props.correlation_id] = (kind, code)


ch.basic_consume(queue=reply_q, on_message_callback=on_reply, auto_ack=True)

ok_body = b'{"a": 1, "b": 2}'
cases = {
    # (properties without reply_to, body)
    "no_correlation_id": ({}, ok_body),
    "wrong_content_type": ({"content_type": "text/plain"}, ok_body),
    "json_with_charset": ({"content_type": "application/json; charset=utf-8"},
                          ok_body),
    "huge_headers": ({"headers": {"h%05d" % i: "x" * 40
                                  for i in range(2000)}}, ok_body),
    "deadline_not_integer": ({"headers": {"x-mqrpc-deadline": "soon"}},
                             ok_body),
    "invalid_utf8": ({}, b'{"a": 1, "b": 2, "s": "\xff\xfe"}'),
    "deep_nesting": ({}, b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "not_an_object": ({}, b"[1, 2]"),
    "not_json": ({}, b"soma 1 2"),
    "empty_body": ({}, b""),
}
for name, (props, body) in cases.items():
    p = dict(props)
    p["reply_to"] = reply_q
    if name != "no_correlation_id":
        p["correlation_id"] = name
    ch.basic_publish(exchange="", routing_key=queue, body=body,
                     properties=pika.BasicProperties(**p))

deadline = time.monotonic() + 5
while time.monotonic() < deadline and len(replies) < len(cases) - 1:
    conn.process_data_events(time_limit=0.2)
conn.process_data_events(time_limit=0.5)  # anything unexpected, too
for name in cases:
    r = replies.pop(name, None)
    print(name, *(r if r else ("none",)))
for corr, r in replies.items():  # a reply to no case: a bug
    print("unexpected", corr, *r)
conn.close()
