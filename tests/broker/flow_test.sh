#!/usr/bin/env bash
# Broker flow control as a caller meets it: with the broker in a memory
# alarm (it blocks publishing connections and stops reading them), a call
# still ends by its deadline, with exit 8 and the broker's reason, and the
# program exits promptly; once the alarm clears, calls are answered again.
# Needs the test broker (ctest fixture "broker") and the ctest environment.
. "$(dirname "$0")/lib.sh"

B=$MQRPC_BIN
broker=$MQRPC_SOURCE_DIR/scripts/broker.sh
q=service_t_flow_$$

alarm() { "$broker" ctl -q set_vm_memory_high_watermark "$1" >/dev/null; }
# The memory monitor notices a new watermark within about a second.
alarm_is() {
    local i
    for ((i = 0; i < 100; i++)); do
        if [[ $("$broker" ctl -q eval 'rabbit_alarm:get_alarms().' 2>/dev/null) == *memory* ]]; then
            [[ $1 == on ]] && return 0
        else
            [[ $1 == off ]] && return 0
        fi
        sleep 0.2
    done
    return 1
}
# Whatever happens, the broker must not stay in alarm for the next tests.
trap 'alarm 0.4; cleanup' EXIT

start_service soma SOMA "$B/service_soma" --queue "$q" || exit 1
rpc --timeout 3000 call "$q" '{"a": 1, "b": 2}'
expect_rc 0
expect_out 3

echo "--- memory alarm on"
alarm 0.0000001
if alarm_is on; then pass; else fail "the memory alarm did not go on"; fi
LABEL='a call while the broker blocks publishers'
rpc --timeout 2000 call "$q" '{"a": 1, "b": 2}'
expect_rc 8
expect_err_line rpc_client 'the broker is blocking publishers'
echo "    $ERR (${ELAPSED_MS} ms)"
# The deadline is 2 s; closing must not wait on a broker that does not read.
if ((ELAPSED_MS < 3500)); then pass; else
    fail "the call took ${ELAPSED_MS} ms with a 2000 ms deadline"; fi

echo "--- memory alarm off"
alarm 0.4
if alarm_is off; then pass; else fail "the memory alarm did not clear"; fi
rpc --timeout 5000 call "$q" '{"a": 2, "b": 2}'
expect_rc 0
expect_out 4
finish
