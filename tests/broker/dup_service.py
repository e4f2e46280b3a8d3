"""A service that answers every request twice, as an instance that died
between its reply and its ack would, once its request was redelivered.

Usage: dup_service.py QUEUE [--late MS]. Prints the services' ready line
when it consumes; answers {"n": 1} then {"n": 2} with the request's
correlation id. With --late MS it answers once, after MS milliseconds,
whatever the caller's deadline: a peer that knows nothing of deadlines, as
the seed's pika service, so a reply can reach a caller that gave up.
"""
import sys
import time

import pika

import mqrpc_pika

queue = sys.argv[1]
late_ms = int(sys.argv[3]) if sys.argv[2:3] == ["--late"] else None
conn = mqrpc_pika.connect("services")
ch = conn.channel()
ch.queue_declare(queue=queue)


def on_request(ch_, method, props, _body):
    if late_ms is not None:
        time.sleep(late_ms / 1000)
    for n in (1,) if late_ms is not None else (1, 2):
        ch_.basic_publish(
            exchange="", routing_key=props.reply_to, body=b'{"n": %d}' % n,
            properties=pika.BasicProperties(
                correlation_id=props.correlation_id))
    ch_.basic_ack(delivery_tag=method.delivery_tag)


ch.basic_consume(queue=queue, on_message_callback=on_request)
print("[x] Serviço DUP pronto...", flush=True)
try:
    ch.start_consuming()
except KeyboardInterrupt:
    pass
