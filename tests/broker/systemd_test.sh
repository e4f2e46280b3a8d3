#!/usr/bin/env bash
# Broker test of the services under systemd's notification protocol, with
# sd_supervisor.py playing systemd (its own NOTIFY_SOCKET, WATCHDOG_USEC and
# WATCHDOG_PID, SIGTERM): READY=1 only once the queue has a consumer (and
# not while the broker cannot be reached), WATCHDOG=1 at half of
# WATCHDOG_USEC while the connection loop runs (a long handler included),
# none without WATCHDOG_USEC or for another WATCHDOG_PID, STATUS= through a
# lost connection, STOPPING=1 after SIGTERM, every message from the main
# pid, exit 0. Also `systemd-analyze verify` of packaging/systemd's unit.
# Usage: systemd_test.sh HAVE_SYSTEMD (ON when the programs were built with
# libsystemd; otherwise only the unit is checked, and the test is skipped).
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
have_systemd=${1:-ON}
broker=$MQRPC_SOURCE_DIR/scripts/broker.sh
unit=$MQRPC_SOURCE_DIR/packaging/systemd/mqrpc-service@.service
q="service_t_$$_sd"
queues=("$q" "$q.dlq")
on_exit() {
    cleanup
    delete_queues "${queues[@]}"
}
trap on_exit EXIT

section() { echo "--- $*"; }

# sup ARGS... -- PROGRAM ARGS...: runs the program under sd_supervisor.py;
# OUT is its JSON report. Prints the messages, for the log.
sup() {
    run "$PY" "$TESTS_DIR/sd_supervisor.py" "$@"
    "$PY" -c '
import json, sys
d = json.loads(sys.argv[1])
print("    pid %s, exit %s; consumers at READY=1: %s" % (d["pid"], d["exit"], d["consumers_at_ready"]))
for m in d["messages"]:
    print("    %8.1f ms  pid %-7s %s" % (m["ms"], m["pid"], m["text"].replace("\n", "\\n")))
for e in d["events"]:
    print("    %8.1f ms  (%s)" % (e["ms"], e["what"]))' "$OUT" 2>/dev/null || show_last
}

# Python expressions on the report d, for expect_json.
texts='[m["text"] for m in d["messages"]]'
pings='[m["ms"] for m in d["messages"] if m["text"] == "WATCHDOG=1"]'
stop_ms='next(e["ms"] for e in d["events"] if e["what"] == "SIGTERM")'
clean='d["exit"] == 0 and all(m["pid"] == d["pid"] for m in d["messages"])'
# gaps LO HI: every interval between pings (and from the last one to the
# SIGTERM) is within [LO, HI] ms, and there are at least MIN pings.
gaps() {
    echo "(lambda p, stop: len(p) >= $3 and all($1 <= b - a <= $2 for a, b in zip(p, p[1:])) and stop - p[-1] <= $2)($pings, $stop_ms)"
}

# ------------------------------------------------------------------- unit
section "systemd-analyze verify packaging/systemd/mqrpc-service@.service"
if command -v systemd-analyze >/dev/null; then
    # As installed, but with the programs of this build and the env files
    # in the test's directory; verify an instance of the template.
    mkdir -p "$tmpdir/unit"
    sed -e "s#/usr/local/bin/#$B/#" -e "s#/etc/mqrpc/#$tmpdir/unit/#" \
        "$unit" >"$tmpdir/unit/mqrpc-service@.service"
    cp "$MQRPC_SOURCE_DIR/packaging/systemd/mqrpc.env" "$tmpdir/unit/"
    for name in soma media busca info resumo; do
        # It says nothing when all is well; it exits 0 after warnings too.
        run systemd-analyze verify "$tmpdir/unit/mqrpc-service@$name.service"
        expect_rc 0
        ok "no warning about mqrpc-service@$name" '[[ -z $OUT && -z $ERR ]]' ||
            show_last
    done
else
    echo "NOTE: no systemd-analyze on this machine: the unit is not verified"
fi

if [[ $have_systemd != ON ]]; then
    echo "NOTE: programs built without libsystemd (MQRPC_SYSTEMD): they do not notify; skipped"
    finish
    exit 77
fi

# ------------------------------------------------------ no watchdog asked
section "READY=1 once consuming, STOPPING=1 after SIGTERM, no WATCHDOG=1 without WATCHDOG_USEC"
sup --queue "$q" --hold 1.5 -- "$B/service_soma" --queue "$q"
expect_json "d['ready_ms'] is not None and d['consumers_at_ready'] == 1"
expect_json "$texts == ['READY=1\nSTATUS=consuming $q', 'STOPPING=1\nSTATUS=stopping: finishing the requests in hand']"
expect_json "d['messages'][1]['ms'] >= $stop_ms"
expect_json "$clean"

# ---------------------------------------------------------- the watchdog
section "WATCHDOG_USEC=1000000: WATCHDOG=1 every 0.5 s from the connection loop"
sup --queue "$q" --watchdog-usec 1000000 --hold 3 -- "$B/service_soma" --queue "$q"
expect_json "d['consumers_at_ready'] == 1 and $texts[0] == 'READY=1\nSTATUS=consuming $q'"
# 0.5 s, plus at most a tick (0.125 s) and the scheduler's delay (a
# loaded machine, a sanitizer build).
expect_json "$(gaps 450 900 6)"
expect_json "$texts[-1].startswith('STOPPING=1')"
expect_json "$clean"

section "WATCHDOG_PID of another process: no WATCHDOG=1 (sd_watchdog_enabled)"
sup --queue "$q" --watchdog-usec 1000000 --watchdog-pid 1 --hold 1.5 -- "$B/service_soma" --queue "$q"
expect_json "d['consumers_at_ready'] == 1 and 'WATCHDOG=1' not in $texts"
expect_json "$clean"

section "a handler of 2.5 s: the pings go on (the connection is serviced meanwhile)"
sup --queue "$q" --watchdog-usec 1000000 --hold 0.5 \
    --during "'$B/rpc_client' --timeout 10000 call '$q' '{\"ms\": 2500}' >'$tmpdir/long.out'" \
    -- "$B/service_work" --queue "$q"
expect_json "$(gaps 450 900 6)"
expect_json "$clean"
ok "the long call was answered" '[[ -s $tmpdir/long.out ]]'

section "--workers 2: READY=1 once both consume, pings from both loops"
sup --queue "$q" --watchdog-usec 1000000 --hold 2 -- "$B/service_soma" --queue "$q" --workers 2
expect_json "d['consumers_at_ready'] == 2"
expect_json "$texts[0] == 'READY=1\nSTATUS=consuming $q on 2 connections' and $texts.count('READY=1\nSTATUS=consuming $q on 2 connections') == 1"
expect_json "$(gaps 450 900 4)"
expect_json "$clean"

# ------------------------------------------------- broker out of reach
section "no READY=1 while the broker cannot be reached; STATUS says why"
printf 'amqp://services:x@127.0.0.1:1/\n' >"$tmpdir/services.url"
chmod 600 "$tmpdir/services.url"
sup --queue "$q" --hold 0.5 --url-file "$tmpdir/services.url" --url-later 2 \
    -- "$B/service_soma" --queue "$q" --url-file "$tmpdir/services.url"
expect_json "$texts[0] == 'STATUS=waiting for the broker: cannot connect to 127.0.0.1:1: connection refused'"
expect_json "d['ready_ms'] is not None and d['ready_ms'] >= 2000 and d['consumers_at_ready'] == 1"
expect_json "$clean"

# ------------------------------------------------------ connection lost
section "a lost connection: STATUS=reconnecting, then consuming again; READY=1 once"
# The service's connection, by its name (the instance id, "$q@host:pid").
close_mine="'$broker' ctl -q list_connections pid client_properties |
    grep -F '\"connection_name\",\"$q@' | cut -f1 |
    while read -r p; do '$broker' ctl -q close_connection \"\$p\" 'systemd test'; done"
sup --queue "$q" --hold 1.5 --during "$close_mine" -- "$B/service_soma" --queue "$q"
expect_json "$texts.count('READY=1\nSTATUS=consuming $q') == 1"
expect_json "any(t.startswith('STATUS=reconnecting: ') for t in $texts)"
expect_json "(lambda t: t.index('STATUS=consuming $q') > [i for i, x in enumerate(t) if x.startswith('STATUS=reconnecting')][0])($texts)"
expect_json "$clean"

finish
