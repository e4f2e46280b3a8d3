#!/usr/bin/env python3
"""A TCP relay on loopback: tcp_relay.py LISTEN_PORT TARGET_PORT SECONDS.

Stands in for a second node of a cluster in the address-list tests: a
program whose URL list names this port reaches the one test broker through
it, and killing the relay drops every connection through it at once, as a
node that dies does. Exits by itself after SECONDS (every test is bounded).
"""
import socket
import sys
import threading
import time


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main():
    listen_port, target_port, seconds = map(int, sys.argv[1:4])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen_port))
    srv.listen(64)
    srv.settimeout(0.2)
    print("listening", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            a, _ = srv.accept()
        except socket.timeout:
            continue
        print("accepted", flush=True)
        b = socket.create_connection(("127.0.0.1", target_port))
        for s in (a, b):  # small AMQP frames: no Nagle delay on each hop
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for x, y in ((a, b), (b, a)):
            threading.Thread(target=pump, args=(x, y), daemon=True).start()


if __name__ == "__main__":
    main()
