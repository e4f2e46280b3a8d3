#!/usr/bin/python3
"""The seed's Python service pattern (services/service_soma.py), for interop.

Usage: seed_service.py QUEUE
Consumes QUEUE and answers {"a": A, "b": B} with a + b, exactly as the seed
does: queue_declare with pika's defaults, basic_qos(prefetch_count=1),
reply to reply_to with the request's correlation_id, then basic_ack.
The broker URL comes from $MQRPC_STATE_DIR/services.url. Prints
"[x] Serviço SOMA pronto..." once consuming; logs each request on stderr
(so a test can tell which implementation answered); SIGTERM or SIGINT
stops it cleanly with exit status 0.
"""
import json
import os
import signal
import sys

import pika

import mqrpc_pika


def get_connection():
    return mqrpc_pika.connect("services")


def get_channel(connection):
    return connection.channel()


class Stop(Exception):
    pass


def on_signal(signum, frame):
    raise Stop()


def processar(data):
    return data["a"] + data["b"]


def on_request(ch, method, props, body):
    data = json.loads(body)
    result = processar(data)
    print("[.] soma(%r, %r) = %r for %s" % (data.get("a"), data.get("b"),
                                            result, props.correlation_id),
          file=sys.stderr, flush=True)
    ch.basic_publish(
        exchange='',
        routing_key=props.reply_to,
        properties=pika.BasicProperties(
            correlation_id=props.correlation_id
        ),
        body=json.dumps(result)
    )
    ch.basic_ack(method.delivery_tag)


def main():
    if len(sys.argv) != 2:
        print("usage: seed_service.py QUEUE", file=sys.stderr)
        return 2
    queue_name = sys.argv[1]
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    connection = None
    try:
        connection = get_connection()
        channel = get_channel(connection)
        channel.queue_declare(queue=queue_name)
        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(queue=queue_name, on_message_callback=on_request)
        # basic_consume waited for consume-ok: we are consuming now.
        sys.stdout.buffer.write("[x] Serviço SOMA pronto...\n".encode("utf-8"))
        sys.stdout.flush()
        channel.start_consuming()
    except Stop:
        pass
    try:
        if connection is not None:
            connection.close()
    except Exception:
        pass  # interrupted mid-I/O: the broker requeues what was unacked
    print("seed_service.py: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
