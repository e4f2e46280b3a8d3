"""pika connections to the test broker, as one of its accounts.

The private broker writes one URL file per account ($MQRPC_STATE_DIR/
clients.url, services.url). Over TLS they are amqps:// URLs with RabbitMQ's
cacertfile/certfile/keyfile query parameters, which pika's URLParameters
does not read, so the SSL context is built here from them.
"""
import os
import ssl
import urllib.parse

import pika


def url(role="clients"):
    with open(os.path.join(os.environ["MQRPC_STATE_DIR"], role + ".url")) as f:
        return f.read().strip()


def parameters(role="clients"):
    u = urllib.parse.urlsplit(url(role))
    if u.scheme != "amqps":
        return pika.URLParameters(url(role))
    q = dict(urllib.parse.parse_qsl(u.query))
    ctx = ssl.create_default_context(cafile=q.get("cacertfile"))
    if "certfile" in q:
        ctx.load_cert_chain(q["certfile"], q.get("keyfile"))
    return pika.ConnectionParameters(
        host=u.hostname, port=u.port or 5671,
        virtual_host=urllib.parse.unquote(u.path[1:]) or "/",
        credentials=pika.PlainCredentials(
            urllib.parse.unquote(u.username), urllib.parse.unquote(u.password)),
        ssl_options=pika.SSLOptions(ctx, server_hostname=u.hostname))


def connect(role="clients"):
    return pika.BlockingConnection(parameters(role))
