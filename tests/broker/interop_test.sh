#!/usr/bin/env bash
# Broker test of wire compatibility with the seed's Python programs:
# - the seed's pika client (seed_client.py) calls our C services;
# - rpc_client calls the seed's pika service (seed_service.py);
# - a C service and the Python service share one queue.
# Needs the test broker (ctest fixture "broker") and the ctest environment.
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
tag=$$
seed_client() { run "$PY" "$TESTS_DIR/seed_client.py" "$@"; }

section() { echo "--- $*"; }

if ! "$PY" -c 'import pika' 2>/dev/null; then
    echo "$PY has no pika module (install python3-pika)" >&2
    exit 1
fi

# ------------------------------------------ seed client -> C services
section "the seed's Python client calls the C services"
ok=1
start_service soma SOMA "$B/service_soma" || ok=0
start_service media MEDIA "$B/service_media" || ok=0
start_service busca BUSCA "$B/service_busca" --db "$tmpdir/busca.db" || ok=0
start_service info INFO "$B/service_info" || ok=0
if ((ok == 1)); then
    seed_client service_soma '{"a": 10, "b": 5}'
    expect_rc 0
    expect_out 15
    seed_client service_media '{"numeros": [10, 20, 30, 40]}'
    expect_rc 0
    expect_out 25.0
    # json.dumps escapes non-ASCII ("Jo\u00e3o"): the service must decode it
    for name in joao João JOAO; do
        seed_client service_busca "{\"nome\": \"$name\"}"
        expect_rc 0
        expect_json 'd == {"idade": 22, "cidade": "São Paulo"}'
    done
    seed_client service_info '{}'
    expect_rc 0
    expect_json 'isinstance(d, dict) and isinstance(d.get("so"), str) and isinstance(d.get("versao"), str)'
    expect_json 'd["instancia"].startswith("service_info@")'
    # An error reply still reaches the seed client (as a JSON body).
    seed_client service_soma '{"a": 1}'
    expect_rc 0
    expect_out_has 'field \"b\" is missing'
fi

# ------------------------------------------ rpc_client -> seed service
section "rpc_client calls the seed's Python service"
q="service_py_${tag}_soma"
if start_service pysoma SOMA "$PY" "$TESTS_DIR/seed_service.py" "$q"; then
    py_pid=$SPAWNED_PID
    rpc() { run "$B/rpc_client" "$@"; }
    rpc call "$q" '{"a": 10, "b": 5}'
    expect_rc 0
    expect_out 15
    for i in 1 2 3 4 5; do
        rpc call "$q" "{\"a\": $i, \"b\": $((i * 100))}"
        expect_rc 0
        expect_out $((i * 101))
    done
    rpc call "$q" '{"a": 1.5, "b": 2}'
    expect_rc 0
    expect_out 3.5
    # and the seed's own client, for reference
    seed_client "$q" '{"a": 10, "b": 5}'
    expect_rc 0
    expect_out 15
    stop_pid "$py_pid" 10
    LABEL="seed_service.py stopped by SIGTERM"
    RC=$STOP_RC OUT='' ERR=$(cat "$tmpdir/pysoma.err")
    expect_rc 0
fi

# ------------------------------------------ mixed instances, one queue
section "a C service and the Python service share one queue"
q="service_q_${tag}"
ok=1
start_service csoma SOMA "$B/service_soma" -v --queue "$q" || ok=0
c_pid=$SPAWNED_PID
start_service pysoma2 SOMA "$PY" "$TESTS_DIR/seed_service.py" "$q" || ok=0
p_pid=$SPAWNED_PID
if ((ok == 1)); then
    bad=0
    for ((i = 1; i <= 20; i++)); do
        run "$B/rpc_client" call "$q" "{\"a\": $i, \"b\": $((i * 2))}"
        if [[ $RC == 0 && $OUT == "$((i * 3))" ]]; then
            pass
        else
            fail "call $i of 20 on the shared queue: expected [$((i * 3))] exit 0"
            show_last
            bad=$((bad + 1))
        fi
    done
    by_c=$(grep -c ' answered ' "$tmpdir/csoma.err")
    by_py=$(grep -c '^\[\.\] soma' "$tmpdir/pysoma2.err")
    echo "shared queue: $by_c answered by C, $by_py by Python"
    if ((by_c + by_py == 20 && by_c > 0 && by_py > 0)); then
        pass
    else
        fail "both implementations should answer part of the 20 calls: C $by_c, Python $by_py"
    fi
fi
if ((ok == 1)); then
    stop_pid "$c_pid" 10
    LABEL="service_soma --queue $q stopped by SIGTERM"
    RC=$STOP_RC OUT='' ERR=$(cat "$tmpdir/csoma.err")
    expect_rc 0
    expect_err_has "stopped after answering $by_c requests"
    stop_pid "$p_pid" 10
    LABEL="seed_service.py $q stopped by SIGTERM"
    RC=$STOP_RC OUT='' ERR=$(cat "$tmpdir/pysoma2.err")
    expect_rc 0
fi

finish
