#!/usr/bin/env bash
# service_resumo, a service that calls services: it answers from
# service_soma's and service_media's answers, several requests at once on
# one handler thread (deferred replies), passes their errors on, and says
# "unavailable" when one of them does not answer. Runs on the fixed queues
# service_soma, service_media and service_resumo.
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
trap 'cleanup; delete_queues service_resumo service_resumo.dlq' EXIT

start_service soma SOMA "$B/service_soma" || exit 1
soma_pid=$SPAWNED_PID
start_service media MEDIA "$B/service_media" || exit 1
# One handler thread and room for 16 requests: the replies are deferred, so
# no request holds the thread while its calls are out.
start_service resumo RESUMO "$B/service_resumo" -v --threads 1 --prefetch 16 || exit 1
resumo_pid=$SPAWNED_PID

LABEL='service_resumo'
rpc call service_resumo '{"numeros": [1, 2, 3, 4]}'
expect_rc 0
expect_json 'd == {"quantidade": 4, "soma": 10, "media": 2.5}'
rpc call service_resumo '{"numeros": [7]}'
expect_rc 0
expect_json 'd == {"quantidade": 1, "soma": 7, "media": 7.0}'
rpc call service_resumo '{"numeros": [1.5, -2, 100]}'
expect_rc 0
expect_json 'd["quantidade"] == 3 and d["soma"] == 99.5 and abs(d["media"] - 99.5 / 3) < 1e-9'

LABEL='16 requests at once on one handler thread'
PIDS=()
for i in $(seq 16); do
    spawn "r$i" "$B/rpc_client" --timeout 20000 call service_resumo \
        "{\"numeros\": [$(seq -s, 1 $((i * 8)))]}"
    PIDS+=("$SPAWNED_PID")
done
good=0
for i in $(seq 16); do
    wait_pid "${PIDS[i - 1]}" 20
    [[ $WAIT_RC == 0 ]] && "$PY" -c '
import json, sys
d = json.load(open(sys.argv[1])); n = int(sys.argv[2])
sys.exit(d != {"quantidade": n, "soma": n * (n + 1) // 2, "media": (n + 1) / 2})' \
        "$tmpdir/r$i.out" $((i * 8)) && good=$((good + 1))
done
ok "all 16 answered right ($good)" "((good == 16))"
ok "by one service_resumo instance" \
    "[[ \$(count_lines '$tmpdir/resumo.err' 'answered') -ge 16 ]]"

LABEL='errors of the services it calls'
rpc call service_resumo '{"numeros": [9223372036854775807, 1]}'
expect_rc 1
expect_err_has 'bad_request: service_soma: a + b overflows a 64-bit integer'
rpc call service_resumo '{"numeros": []}'
expect_rc 1
expect_err_has 'bad_request: field "numeros" must be a non-empty list of numbers'
rpc call service_resumo '{"numeros": [1, "x"]}'
expect_rc 1
expect_err_has '"numeros"[1] must be a number, got string'

LABEL='service_soma stopped'
stop_pid "$soma_pid"
rpc --timeout 1500 call service_resumo '{"numeros": [1, 2]}'
expect_rc 1
expect_err_has 'service_resumo: unavailable: service_soma: no reply from service_soma within'
ok "in about the caller's time" "((ELAPSED_MS < 5000))"

stop_pid "$resumo_pid"
ok "service_resumo exits cleanly" "[[ $STOP_RC == 0 ]]"
finish
