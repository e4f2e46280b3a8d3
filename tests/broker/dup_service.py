"""A service that answers every request twice, as an instance that died
between its reply and its ack would, once its request was redelivered.

Usage: dup_service.py QUEUE. Prints the services' ready line when it
consumes; answers {"n": 1} then {"n": 2} with the request's correlation id.
"""
import sys

import pika

import mqrpc_pika

queue = sys.argv[1]
conn = mqrpc_pika.connect("services")
ch = conn.channel()
ch.queue_declare(queue=queue)


def on_request(ch_, method, props, _body):
    for n in (1, 2):
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
