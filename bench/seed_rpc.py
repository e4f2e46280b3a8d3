#!/usr/bin/python3
"""The seed's Python RPC (pika), as a baseline for `make bench`.

Usage:
  seed_rpc.py serve [--url URL] [--queue Q] [--prefetch N]
  seed_rpc.py call  [--url URL] [--queue Q] [-c INFLIGHT]
                    [-n CALLS | -d SECONDS] [--warmup CALLS]

serve is the seed's soma service (services/service_soma.py, as in
tests/broker/seed_service.py): queue_declare with pika's defaults,
basic_qos(prefetch_count=N), json.loads the request, reply json.dumps(a + b)
to reply_to with the request's correlation_id, then basic_ack. It prints
"ready" once consuming (and, unlike the seed, nothing per request);
SIGTERM or SIGINT stops it with exit status 0.

call is the seed's RPCClient (client/rpc_client.py, as in
tests/broker/seed_client.py): BlockingConnection, an exclusive server-named
callback queue consumed without auto_ack (as the seed does), corr_id =
str(uuid4()), basic_publish, then process_data_events until the response
arrives. With -c 1 that is exactly the seed's call() in a loop; with -c > 1
the same client keeps C requests outstanding (publish C, then one more per
response). Each reply must be 3. The first --warmup calls (default 1000) are
not measured, then -n calls (default 20000) or -d seconds are. Prints one
JSON line like bench/bare_pingpong; exit 0 without errors, 1 with, 2 on a
usage error, 3 on any other failure (one line on stderr).

URL: --url, else $AMQP_URL, else amqp://guest:guest@localhost:5672/.
Latencies: time.perf_counter, from the start of the call (uuid4,
json.dumps, basic_publish) to the response handled.
"""
import argparse
import json
import os
import signal
import sys
import time
import uuid

import pika

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
REPLY_TIMEOUT_S = 10.0
MESSAGE = {"a": 1, "b": 2}
EXPECTED = 3


class Stop(Exception):
    pass


def on_signal(signum, frame):
    raise Stop()


# ---- serve: the seed's service ---------------------------------------------

def processar(data):
    return data["a"] + data["b"]


def on_request(ch, method, props, body):
    data = json.loads(body)
    result = processar(data)
    ch.basic_publish(
        exchange='',
        routing_key=props.reply_to,
        properties=pika.BasicProperties(
            correlation_id=props.correlation_id
        ),
        body=json.dumps(result)
    )
    ch.basic_ack(method.delivery_tag)


def serve(args):
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    connection = None
    try:
        connection = pika.BlockingConnection(pika.URLParameters(args.url))
        channel = connection.channel()
        channel.queue_declare(queue=args.queue)
        channel.basic_qos(prefetch_count=args.prefetch)
        channel.basic_consume(queue=args.queue, on_message_callback=on_request)
        # basic_consume waited for consume-ok: we are consuming now.
        print("ready", flush=True)
        channel.start_consuming()
    except Stop:
        pass
    try:
        if connection is not None:
            connection.close()
    except Exception:
        pass  # interrupted mid-I/O: the broker requeues what was unacked
    return 0


# ---- call: the seed's client -----------------------------------------------

class RPCClient:
    def __init__(self, url):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.callback_queue = self.channel.queue_declare(queue='', exclusive=True).method.queue
        self.channel.basic_consume(queue=self.callback_queue, on_message_callback=self.on_response)
        self.response = None
        self.corr_id = None
        # -c > 1: correlation id -> start time, and (latency, body) answered
        self.pending = {}
        self.answered = []
        self.unknown = 0

    def on_response(self, ch, method, props, body):
        if props.correlation_id == self.corr_id:
            self.response = body
        elif props.correlation_id in self.pending:
            started = self.pending.pop(props.correlation_id)
            self.answered.append((time.perf_counter() - started, body))
        else:
            self.unknown += 1

    def call(self, service_name, message):
        """The seed's call(), with a bounded wait."""
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
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while self.response is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply within %g s" % REPLY_TIMEOUT_S)
            self.connection.process_data_events(time_limit=min(left, 0.1))
        return self.response

    def send(self, service_name, message, started):
        """call() without the wait: the request stays outstanding."""
        corr_id = str(uuid.uuid4())
        self.pending[corr_id] = started
        self.channel.basic_publish(
            exchange='',
            routing_key=service_name,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=corr_id
            ),
            body=json.dumps(message)
        )

    def wait_answers(self):
        """process_data_events until at least one outstanding call answers."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while not self.answered:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply within %g s (%d calls outstanding)"
                                   % (REPLY_TIMEOUT_S, len(self.pending)))
            self.connection.process_data_events(time_limit=min(left, 0.1))
        answered, self.answered = self.answered, []
        return answered


def is_expected(body):
    try:
        return json.loads(body) == EXPECTED
    except ValueError:
        return False


class Run:
    """Warm-up, then the measured calls; the same accounting as bare_pingpong."""

    def __init__(self, args):
        self.args = args
        self.latencies = []
        self.completed = 0
        self.errors = 0
        self.t_start = time.perf_counter()
        self.t_end = self.t_start

    def done(self, latency, body, now):
        if not is_expected(body):
            self.errors += 1
        self.completed += 1
        if self.completed <= self.args.warmup:
            if self.completed == self.args.warmup:
                self.t_start = now
        else:
            self.latencies.append(latency)
            self.t_end = now

    def more(self, published, now):
        if self.args.seconds is None:
            return published < self.args.warmup + self.args.calls
        return (self.completed < self.args.warmup
                or now - self.t_start < self.args.seconds)


def call(args):
    client = RPCClient(args.url)
    run = Run(args)
    published = 0
    if args.inflight == 1:
        while run.more(published, time.perf_counter()):
            started = time.perf_counter()
            body = client.call(args.queue, MESSAGE)
            now = time.perf_counter()
            published += 1
            run.done(now - started, body, now)
    else:
        while published < args.inflight and run.more(published, time.perf_counter()):
            client.send(args.queue, MESSAGE, time.perf_counter())
            published += 1
        while client.pending:
            for latency, body in client.wait_answers():
                now = time.perf_counter()
                run.done(latency, body, now)
                if run.more(published, now):
                    client.send(args.queue, MESSAGE, time.perf_counter())
                    published += 1
    client.connection.close()

    errors = run.errors + client.unknown
    lat = sorted(run.latencies)
    n = len(lat)
    seconds = run.t_end - run.t_start if n else 0.0

    def pct(per_mille):  # nearest rank, microseconds
        if n == 0:
            return 0.0
        rank = (n * per_mille + 999) // 1000
        return round(lat[max(rank, 1) - 1] * 1e6, 1)

    print(json.dumps({
        "impl": "python pika (seed style)",
        "inflight": args.inflight,
        "calls": n,
        "seconds": round(seconds, 3),
        "calls_per_s": round(n / seconds, 1) if seconds > 0 else 0.0,
        "p50_us": pct(500),
        "p90_us": pct(900),
        "p99_us": pct(990),
        "max_us": pct(1000),
        "errors": errors,
    }, separators=(",", ":")), flush=True)
    return 0 if errors == 0 else 1


# ---- command line ------------------------------------------------------------

def positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def natural_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def positive_float(s):
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("AMQP_URL") or DEFAULT_URL)
    common.add_argument("--queue", default="service_seed")
    p = argparse.ArgumentParser(prog="seed_rpc.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", parents=[common])
    s.add_argument("--prefetch", type=natural_int, default=1)
    c = sub.add_parser("call", parents=[common])
    c.add_argument("-c", dest="inflight", type=positive_int, default=1)
    how = c.add_mutually_exclusive_group()
    how.add_argument("-n", dest="calls", type=positive_int, default=20000)
    how.add_argument("-d", dest="seconds", type=positive_float, default=None)
    c.add_argument("--warmup", type=natural_int, default=1000)
    return p.parse_args(argv)  # exits 2 on a usage error


def main():
    args = parse_args(sys.argv[1:])
    try:
        return serve(args) if args.command == "serve" else call(args)
    except Exception as e:  # one line, as bare_pingpong does
        print("seed_rpc.py: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
