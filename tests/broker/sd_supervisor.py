#!/usr/bin/python3
"""Plays systemd for one service program: its own NOTIFY_SOCKET (an AF_UNIX
datagram socket in a temporary directory, with SO_PASSCRED so each message
carries its sender's pid, as systemd checks for NotifyAccess=main), the
watchdog variables, a SIGTERM, and prints what it saw as one JSON object:

  {"pid": P, "exit": RC, "ready_ms": T or null, "consumers_at_ready": N,
   "messages": [{"ms": T, "pid": P, "text": "READY=1\\nSTATUS=..."}, ...],
   "events": [{"ms": T, "what": "..."}]}

ms counts from the start of the program. Every wait is bounded.

Usage: sd_supervisor.py [options] -- PROGRAM ARGS...
  --queue Q             at READY=1, ask the broker how many consumers Q has
  --watchdog-usec N     set WATCHDOG_USEC=N (and WATCHDOG_PID, see below)
  --watchdog-pid self|N WATCHDOG_PID: the program's own pid (default), or N
  --hold S              seconds to keep it running after READY=1 (default 1)
  --ready-timeout S     give up waiting for READY=1 after S s (default 15)
  --url-file F --url-later S
                        write the services' URL into F S seconds after the
                        start (F is given to the program as --url-file and
                        points to a closed port until then)
  --during CMD          shell command run once READY=1 came (e.g. a call
                        or closing the program's connection), output ignored
"""
import argparse
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import mqrpc_pika


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queue")
    ap.add_argument("--watchdog-usec", type=int)
    ap.add_argument("--watchdog-pid", default="self")
    ap.add_argument("--hold", type=float, default=1.0)
    ap.add_argument("--ready-timeout", type=float, default=15.0)
    ap.add_argument("--url-file")
    ap.add_argument("--url-later", type=float)
    ap.add_argument("--during")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd

    tmp = tempfile.mkdtemp(prefix="mqrpc-notify.")
    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    env = dict(os.environ, NOTIFY_SOCKET=path)
    for k in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(k, None)
    if a.watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(a.watchdog_usec)
        if a.watchdog_pid != "self":
            env["WATCHDOG_PID"] = a.watchdog_pid
    # systemd sets WATCHDOG_PID to the pid it forked; exec keeps it.
    wrapper = 'export WATCHDOG_PID="${WATCHDOG_PID:-$$}"; exec "$0" "$@"'
    if a.watchdog_usec is None:
        wrapper = 'exec "$0" "$@"'

    # Opened before the start: at READY=1 only the passive declare remains.
    broker = mqrpc_pika.connect("clients") if a.queue else None

    t0 = time.monotonic()
    ms = lambda: round((time.monotonic() - t0) * 1000, 1)
    messages, events = [], []
    lock = threading.Lock()
    ready = threading.Event()
    stop_reading = threading.Event()

    proc = subprocess.Popen(["sh", "-c", wrapper] + cmd, env=env,
                            stdin=subprocess.DEVNULL, stdout=sys.stderr,
                            stderr=sys.stderr)

    def reader():
        creds_len = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not stop_reading.is_set():
            r, _, _ = select.select([sock], [], [], 0.05)
            if not r:
                continue
            data, anc, _, _ = sock.recvmsg(4096, creds_len)
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            text = data.decode("utf-8", "replace")
            with lock:
                messages.append({"ms": ms(), "pid": pid, "text": text})
            if "READY=1" in text.split("\n"):
                ready.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()

    consumers = None
    if a.url_file and a.url_later is not None:
        deadline = t0 + a.url_later
        while time.monotonic() < deadline and not ready.is_set():
            time.sleep(0.02)
        with open(os.path.join(os.environ["MQRPC_STATE_DIR"],
                               "services.url")) as f:
            url = f.read()
        tmpf = a.url_file + ".new"
        fd = os.open(tmpf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, url.encode())
        os.close(fd)
        os.rename(tmpf, a.url_file)
        events.append({"ms": ms(), "what": "url file now points to the broker"})

    got_ready = ready.wait(a.ready_timeout)
    if got_ready and broker:
        ch = broker.channel()
        ok = ch.queue_declare(queue=a.queue, passive=True).method
        consumers = ok.consumer_count
        events.append({"ms": ms(), "what": "consumers %d" % consumers})
        broker.close()
    if got_ready and a.during:
        events.append({"ms": ms(), "what": "during: " + a.during})
        subprocess.run(["bash", "-c", a.during], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=sys.stderr,
                       timeout=60)
        events.append({"ms": ms(), "what": "during done"})
    if got_ready:
        time.sleep(a.hold)
    events.append({"ms": ms(), "what": "SIGTERM"})
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        events.append({"ms": ms(), "what": "killed after 15 s"})
    events.append({"ms": ms(), "what": "exited %d" % rc})
    time.sleep(0.1)  # the last datagrams
    stop_reading.set()
    th.join(2)
    sock.close()
    os.unlink(path)
    os.rmdir(tmp)
    ready_ms = next((m["ms"] for m in messages
                     if "READY=1" in m["text"].split("\n")), None)
    print(json.dumps({"pid": proc.pid, "exit": rc, "ready_ms": ready_ms,
                      "consumers_at_ready": consumers, "messages": messages,
                      "events": events}, indent=1))


if __name__ == "__main__":
    main()
