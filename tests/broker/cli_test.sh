#!/usr/bin/env bash
# Broker test of the programs as a user runs them: rpc_client's commands and
# menu against the four services on their fixed queues, every error a user
# can meet (message on stderr and exit code), requests without reply_to,
# heartbeats while idle at the menu, and stopping a busy service.
# Needs the test broker (ctest fixture "broker") and the ctest environment.
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
tag=$$

section() { echo "--- $*"; }

# ---------------------------------------------------------------- services
section "the four services on their fixed queues"
ok=1
start_service soma SOMA "$B/service_soma" -v || ok=0
soma_pid=$SPAWNED_PID
start_service media MEDIA "$B/service_media" || ok=0
start_service busca BUSCA "$B/service_busca" --db "$tmpdir/busca.db" || ok=0
start_service info INFO "$B/service_info" || ok=0
if ((ok == 0)); then
    finish
    exit 1
fi

# ----------------------------------------------------------- good answers
section "answers"
rpc soma 10 5
expect_rc 0
expect_out 15
rpc soma 1.5 2
expect_rc 0
expect_out 3.5
rpc soma -3 1
expect_rc 0
expect_out -2
rpc media 10 20 30 40
expect_rc 0
expect_out 25.0
for name in joao João JOAO; do
    rpc busca "$name"
    expect_rc 0
    expect_out '{"idade": 22, "cidade": "São Paulo"}'
done
rpc info
expect_rc 0
expect_json 'isinstance(d, dict) and {"so", "versao", "hostname", "pid", "instancia"} <= set(d)'
expect_json 'd["instancia"].startswith("service_info@")'
rpc -v soma 1 2
expect_rc 0
expect_out 3
expect_err_has "answered by service_soma@"
rpc call service_soma '{"a": 10, "b": 5}'
expect_rc 0
expect_out 15
echo '{"a": 2, "b": 3}' >"$tmpdir/body.json"
rpc call service_soma - <"$tmpdir/body.json"
expect_rc 0
expect_out 5

# ------------------------------------------ command-line conventions
section "options after the arguments, negative numbers, --"
rpc call service_soma '{"a":1,"b":2}' --timeout 4000
expect_rc 0
expect_out 3
rpc soma 1 2 -v
expect_rc 0
expect_out 3
expect_err_has "answered by service_soma@"
rpc soma -5 3
expect_rc 0
expect_out -2
rpc soma -5 -3 --timeout 4000
expect_rc 0
expect_out -8
rpc media -1.5 2 -3
expect_rc 0
expect_json 'abs(d - (-2.5 / 3)) < 1e-12'
rpc media -1.5 --timeout 4000 2 -3 -v
expect_rc 0
expect_json 'abs(d - (-2.5 / 3)) < 1e-12'
expect_err_has "answered by service_media@"
# "--" ends the options: a name that starts with '-' is a name.
rpc busca -- -x
expect_rc 1
expect_err_line rpc_client 'service_busca: not_found: no person named "-x"'
rpc -v -- busca --timeout
expect_rc 1
expect_err_has 'service_busca: not_found: no person named "--timeout"'
rpc busca -x
expect_rc 2
expect_out_empty
expect_err_line rpc_client 'unknown option -x (try --help)'
rpc soma 1 2 --bogus
expect_rc 2
expect_out_empty
expect_err_line rpc_client 'unknown option or missing value: --bogus (try --help)'
rpc call service_soma '{"a":1,"b":2}' --timeout
expect_rc 2
expect_err_line rpc_client 'unknown option or missing value: --timeout (try --help)'
run "$B/rpc_bench" service_soma '{"a":1,"b":2}' -n 20 --warmup 0 --json --expect 3
expect_rc 0
expect_json 'd["calls"] == 20 and d["errors"] == 0 and d["queue"] == "service_soma"'
run "$B/rpc_bench" service_soma --bogus
expect_rc 2
expect_err_line rpc_bench 'unknown option or missing value: --bogus (try --help)'
run "$B/service_soma" extra --queue "service_t_${tag}_dead"
expect_rc 2
expect_err_line service_soma 'unexpected argument "extra" (try --help)'
run "$B/service_soma" -- --queue "service_t_${tag}_dead"
expect_rc 2
expect_err_line service_soma 'unexpected argument "--queue" (try --help)'

# -------------------------------------------------------- remote errors
section "error replies (exit 1)"
rpc call service_soma '{"a": 1}'
expect_rc 1
expect_out_empty
expect_err_line rpc_client 'service_soma: bad_request: field "b" is missing'
rpc soma 9223372036854775807 1
expect_rc 1
expect_err_line rpc_client 'service_soma: bad_request: a + b overflows a 64-bit integer'
rpc call service_media '{"numeros": []}'
expect_rc 1
expect_err_line rpc_client 'service_media: bad_request: numeros must not be empty'
rpc --raw call service_soma 'nope'
expect_rc 1
expect_err_line rpc_client 'service_soma: bad_request: request body is not valid JSON'
rpc call service_soma '[1]'
expect_rc 2
expect_err_line rpc_client 'the body must be a JSON object'
rpc call service_soma 'nope'
expect_rc 2
expect_err_line rpc_client 'the body is not valid JSON'
rpc --raw call service_soma '[1]'
expect_rc 1
expect_err_line rpc_client 'service_soma: bad_request: request body must be a JSON object, got'
expect_err_has 'array'
# 1.1 MiB, over the services' default limit of 1 MiB
{
    printf '{"a": 1, "b": 2, "pad": "'
    head -c 1153434 /dev/zero | tr '\0' x
    printf '"}'
} >"$tmpdir/big.json"
rpc --raw call service_soma - <"$tmpdir/big.json"
expect_rc 1
expect_err_line rpc_client "service_soma: bad_request: request body is $(stat -c %s "$tmpdir/big.json") bytes, over the limit of 1048576"
rpc soma 1 2 # still alive after the oversized request
expect_rc 0
expect_out 3
check "service_soma still running after the oversized request" kill -0 "$soma_pid"
rpc busca maria
expect_rc 1
expect_err_line rpc_client 'service_busca: not_found: no person named "maria"'

# ------------------------------------------------------ transport errors
section "no service, timeout, broker errors"
rpc --timeout 30000 call nobody_here '{}'
expect_rc 5
expect_err_line rpc_client 'no service on queue nobody_here'
expect_faster_than 2000

if start_service sleep WORK "$B/service_work" --queue "service_t_${tag}_sleep"; then
    rpc --timeout 300 call "service_t_${tag}_sleep" '{"ms": 2000}'
    expect_rc 4
    expect_out_empty
    expect_err_line rpc_client "no reply from service_t_${tag}_sleep within 300 ms (1 instance consuming"
    expect_faster_than 2000
fi

rpc --url amqp://127.0.0.1:1/ info
expect_rc 3
expect_err_line rpc_client 'cannot connect to 127.0.0.1:1: connection refused'
url=$(broker_url)
user=$(sed -E 's#^amqps?://([^:]+):.*#\1#' <<<"$url")
hostport=${url#*@}
hostport=${hostport%%/*}
bad_url=$(printf '%s' "$url" | sed -E 's#^(amqps?://[^:]+:)[^@]*@#\1not-the-password@#')
AMQP_URL=$bad_url rpc soma 1 2
expect_rc 3
expect_err_line rpc_client "login refused by $hostport for user \"$user\""
rpc --url 'http://x' info
expect_rc 2
expect_err_line rpc_client 'malformed broker URL'
# $AMQP_URL is used when there is no --url, and wins over the state dir
AMQP_URL=amqp://u:p@127.0.0.1:1/ rpc info
expect_rc 3
expect_err_has 'cannot connect to 127.0.0.1:1'

section "usage errors (exit 2)"
for args in "soma 1" "soma a b" "soma 1 2 3" "frobnicate" "--bogus" \
    "--timeout 0" "--timeout x info" "media" "media 1 x" "busca" \
    "busca a b" "info x" "call" "call q"; do
    read -ra argv <<<"$args"
    rpc "${argv[@]}"
    expect_rc 2
    expect_out_empty
    expect_err_line rpc_client ''
done
rpc soma a b
expect_err_line rpc_client 'not a number, or an integer beyond 64 bits: "a" (try --help)'
# An integer too big for 64 bits is refused, not rounded to a real.
rpc soma 9223372036854775808 1
expect_rc 2
expect_out_empty
expect_err_has 'integer beyond 64 bits: "9223372036854775808"'
rpc frobnicate
expect_err_line rpc_client 'unknown command "frobnicate"'
rpc --help
expect_rc 0
expect_out_has 'Usage:'
expect_out_has 'Exit codes'
rpc --version
expect_rc 0
expect_out_has 'rpc_client'

section "service start-up errors"
AMQP_URL=amqp://u:p@127.0.0.1:1/ run "$B/service_soma" --connect-timeout 0 --queue "service_t_${tag}_dead"
expect_rc 3
expect_err_line service_soma 'cannot connect to 127.0.0.1:1'
# By default a service waits for a broker that is down, saying so once;
# --connect-timeout bounds the wait.
AMQP_URL=amqp://u:p@127.0.0.1:1/ run "$B/service_soma" --connect-timeout 1500 --queue "service_t_${tag}_dead"
expect_rc 3
expect_err_has 'cannot connect to 127.0.0.1:1: connection refused; retrying for up to 1.5 s'
if ((ELAPSED_MS >= 1400 && ELAPSED_MS < 6000)); then pass; else
    fail "--connect-timeout 1500 returned after ${ELAPSED_MS} ms"; fi
if [[ $(grep -c 'retrying' <<<"$ERR") == 1 ]]; then pass; else
    fail "the wait for the broker should be logged once"; show_last; fi
run "$B/service_soma" --prefetch 0 --queue "service_t_${tag}_dead"
expect_rc 2
expect_err_has 'prefetch'
AMQP_URL=$bad_url run "$B/service_soma" --queue "service_t_${tag}_dead"
expect_rc 3
expect_err_has 'login refused'
run "$B/service_soma" extra
expect_rc 2
run "$B/service_soma" --help
expect_rc 0
expect_out_has 'Usage:'

# ------------------------------------------------- request without reply_to
section "a request without reply_to is acknowledged and dropped"
q="service_t_${tag}_noreply"
if start_service noreply SOMA "$B/service_soma" --queue "$q"; then
    "$PY" - "$q" <<'EOF'
import json, sys, pika, mqrpc_pika
conn = mqrpc_pika.connect("clients")
conn.channel().basic_publish(
    exchange='', routing_key=sys.argv[1],
    properties=pika.BasicProperties(correlation_id="no-reply-to-test"),
    body=json.dumps({"a": 1, "b": 2}))
conn.close()
EOF
    if wait_for_line "$tmpdir/noreply.err" "request without reply_to" 5; then
        pass
    else
        fail "service stderr should say \"request without reply_to\", got: $(cat "$tmpdir/noreply.err")"
    fi
    check "queue $q is empty, with 1 consumer (messages consumers: 0 1)" \
        wait_queue "$q" "0 1" 5
    rpc call "$q" '{"a": 20, "b": 22}'
    expect_rc 0
    expect_out 42
fi

# ------------------------------------------------------------------ menu
section "interactive menu through a pipe"
rpc < <(printf '1\n10\n5\n2\n10 20 30 40\n3\njoao\n4\n9\n0\n')
expect_rc 0
expect_out_has $'=== Cliente RPC ===\n1 - Soma\n2 - Média\n3 - Busca\n4 - Info do Servidor\n\nEscolha o serviço: '
expect_out_has 'Escolha o serviço: A: B: Resultado: 15'
expect_out_has 'Lista (ex: 1 2 3): Resultado: 25.0'
expect_out_has 'Nome para buscar: Resultado: {"idade": 22, "cidade": "São Paulo"}'
expect_out_has 'Escolha o serviço: Resultado: {"so": '
expect_out_has 'invalid choice "9": type 1 to 4, or 0 or q to quit'
n=$(grep -c '=== Cliente RPC ===' <<<"$OUT")
if [[ $n == 6 ]]; then pass; else fail "menu shown $n times, expected 6"; fi

rpc < <(printf '1\n2\n3\n')
expect_rc 0
expect_out_has 'A: B: Resultado: 5'
rpc < <(printf 'q\n')
expect_rc 0
rpc < <(printf '1\nx\n2\n1\n1\n0\n')
expect_rc 0
expect_out_has 'A: invalid number "x"'
expect_out_has 'Lista (ex: 1 2 3): Resultado: 1.0'
rpc </dev/null
expect_rc 0
# the menu connects first: a dead broker is reported before any typing
rpc --url amqp://127.0.0.1:1/ < <(printf '4\n0\n')
expect_rc 3
expect_err_line rpc_client 'cannot connect to 127.0.0.1:1'
rpc < <(printf '3\nmaria\n1\n1\n1\n0\n')
expect_rc 0
expect_err_has 'no person named "maria"'
expect_out_has 'Resultado: 2'

# --------------------------------------------------------------- heartbeat
# Idle at the prompt for 5 s with a 1 s heartbeat: without heartbeats the
# broker closes the connection after about 2 s. Both calls must be answered
# over the same connection: the correlation id prefix is per connection
# (rpc_client reconnects silently, which would hide a missing heartbeat).
section "heartbeats while idle at the menu"
n0=$(wc -l <"$tmpdir/soma.err")
rpc --heartbeat 1 < <(
    printf '1\n1\n2\n'
    sleep 5
    printf '1\n3\n4\n0\n'
)
expect_rc 0
expect_out_has 'Resultado: 3'
expect_out_has 'Resultado: 7'
prefixes=$(tail -n +"$((n0 + 1))" "$tmpdir/soma.err" | sed -n 's/.* answered \([0-9a-f]*\)-.*/\1/p')
if [[ $(wc -l <<<"$prefixes") == 2 && $(sort -u <<<"$prefixes" | wc -l) == 1 ]]; then
    pass
else
    fail "both menu calls should come over one connection (one correlation prefix), got: [${prefixes//$'\n'/ }]"
fi

# ------------------------------------------------------ SIGTERM while busy
# The request must be inside the handler when SIGTERM comes, whatever the
# load: a first instance declares the queue and is stopped while idle, the
# request then waits in the queue, a second instance takes it, and SIGTERM
# goes 300 ms after the broker shows it delivered.
section "SIGTERM while busy: finish the request, then exit 0"
q="service_t_${tag}_busy"
if start_service idle WORK "$B/service_work" --queue "$q"; then
    t0=$(now_ms)
    stop_pid "$SPAWNED_PID" 5
    LABEL="service_work stopped by SIGTERM while idle"
    RC=$STOP_RC OUT='' ERR=$(cat "$tmpdir/idle.err")
    expect_rc 0
    expect_err_has 'stopped after answering 0 requests'
    check "an idle service stops within 2 s of SIGTERM" test $(($(now_ms) - t0)) -lt 2000

    spawn busyclient "$B/rpc_client" --timeout 10000 call "$q" '{"ms": 1500}'
    client_pid=$SPAWNED_PID
    check "the request waits in $q (messages consumers: 1 0)" wait_queue "$q" "1 0" 10
    if start_service busy WORK "$B/service_work" --queue "$q"; then
        busy_pid=$SPAWNED_PID
        check "the request was delivered (messages consumers: 0 1)" wait_queue "$q" "0 1" 10
        sleep 0.3
        t0=$(now_ms)
        stop_pid "$busy_pid" 10
        stopped_ms=$(($(now_ms) - t0))
        LABEL="service_work stopped by SIGTERM while busy"
        RC=$STOP_RC OUT=$(cat "$tmpdir/busy.out") ERR=$(cat "$tmpdir/busy.err")
        expect_rc 0
        expect_err_has 'stopped after answering 1 requests'
        if ((stopped_ms >= 500)); then
            pass
        else
            fail "the service exited ${stopped_ms} ms after SIGTERM: it cannot have finished a 1500 ms request"
        fi
    fi
    wait_pid "$client_pid" 15
    LABEL="rpc_client call $q (service stopped meanwhile)"
    RC=$WAIT_RC OUT=$(cat "$tmpdir/busyclient.out") ERR=$(cat "$tmpdir/busyclient.err")
    expect_rc 0
    expect_out '{"slept": 1500}'
fi

# An idle service stops promptly too.
stop_pid "$soma_pid" 5
LABEL="service_soma stopped by SIGTERM while idle"
RC=$STOP_RC OUT='' ERR=$(cat "$tmpdir/soma.err")
expect_rc 0
expect_err_has 'stopped after answering'

finish
