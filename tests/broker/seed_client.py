#!/usr/bin/python3
"""The seed's Python RPC client (client/rpc_client.py), for interop tests.

Usage: seed_client.py QUEUE JSON
Sends JSON (parsed, then re-encoded with json.dumps as the seed does) to
QUEUE and prints the raw reply body. The broker URL comes from
$MQRPC_STATE_DIR/clients.url (the test broker). Exit 0 on a reply, 4 when no
reply came within the deadline (the seed waits forever; a test must not).

The RPCClient class is the seed's, verbatim except for: the connection URL,
a bounded wait in call(), and returning bytes (the test parses them).
"""
import json
import os
import sys
import time
import uuid

import pika

import mqrpc_pika

DEADLINE_S = float(os.environ.get("SEED_CLIENT_DEADLINE", "10"))


def get_connection():
    """The seed connects to localhost; the tests use their private broker."""
    return mqrpc_pika.connect("clients")


class RPCClient:
    def __init__(self):
        self.connection = get_connection()
        self.channel = self.connection.channel()
        self.callback_queue = self.channel.queue_declare(queue='', exclusive=True).method.queue
        self.channel.basic_consume(queue=self.callback_queue, on_message_callback=self.on_response)
        self.response = None
        self.corr_id = None

    def on_response(self, ch, method, props, body):
        if props.correlation_id == self.corr_id:
            self.response = body

    def call(self, service_name, message):
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange='',
            routing_key=service_name,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=self.corr_id
            ),
            body=json.dumps(message)
        )
        deadline = time.monotonic() + DEADLINE_S
        while self.response is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from %s within %g s"
                                   % (service_name, DEADLINE_S))
            self.connection.process_data_events(time_limit=min(left, 0.1))
        return self.response


def main():
    if len(sys.argv) != 3:
        print("usage: seed_client.py QUEUE JSON", file=sys.stderr)
        return 2
    message = json.loads(sys.argv[2])
    client = RPCClient()
    try:
        body = client.call(sys.argv[1], message)
    except TimeoutError as e:
        print("seed_client.py: %s" % e, file=sys.stderr)
        return 4
    finally:
        client.connection.close()
    sys.stdout.buffer.write(body + b"\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
