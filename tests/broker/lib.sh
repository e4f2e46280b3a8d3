# shellcheck shell=bash
# Shared helpers for the broker-tier shell tests. Source it from a test:
#   . "$(dirname "$0")/lib.sh"
# It needs the environment ctest gives broker tests (see CMakeLists.txt):
# MQRPC_BIN, MQRPC_STATE_DIR (with the test broker's URL files).
#
# Conventions: run a command with `run CMD...` (bounded in time; sets OUT,
# ERR, RC and ELAPSED_MS), then check what a user would see with expect_*.
# Failures are counted, not fatal; `finish` prints "N passed, M failed" and
# gives the script's exit status. Background processes started with
# start_service/spawn are stopped by PID when the script exits.

# shellcheck disable=SC2034 # variables set here are read by the tests
set -u

: "${MQRPC_BIN:?MQRPC_BIN must name the directory of the built programs}"
: "${MQRPC_STATE_DIR:?MQRPC_STATE_DIR must name the test broker state dir}"

PY=/usr/bin/python3 # the system one has pika; a pyenv python3 may not
TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
export PYTHONPATH=$TESTS_DIR # mqrpc_pika
RUN_TIMEOUT=${RUN_TIMEOUT:-60} # seconds, for any single foreground command
READY_TIMEOUT=10               # seconds for a service to say it is ready

tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/mqrpc-test.XXXXXX")
passed=0
failed=0
spawned=() # PIDs we started and must stop
OUT='' ERR='' RC=0 ELAPSED_MS=0 LABEL=''

# Stop what we started: SIGTERM, up to 5 s of grace in all, then SIGKILL.
# By PID only, never by name. Not interruptible, so that it always finishes.
cleanup() {
    local pid i alive
    trap '' INT TERM HUP
    for pid in "${spawned[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "${spawned[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${spawned[@]}"; do
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    spawned=()
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        echo "kept $tmpdir"
    else
        rm -rf "$tmpdir"
    fi
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 130' INT TERM HUP

now_ms() { date +%s%3N; }

# broker_url [clients|services]: the URL (with password) of an account.
broker_url() { cat "$MQRPC_STATE_DIR/${1:-clients}.url"; }

# Forgets a PID once the test itself has reaped it.
forget() {
    local pid=$1 i
    for i in "${!spawned[@]}"; do
        [[ ${spawned[$i]} == "$pid" ]] && unset 'spawned[i]'
    done
    spawned=("${spawned[@]}")
}

# ------------------------------------------------------------ assertions

pass() { passed=$((passed + 1)); }

fail() {
    failed=$((failed + 1))
    echo "FAIL: $*"
}

# Shows what the last command printed, after a failed check on it.
show_last() {
    echo "    command: $LABEL"
    echo "    exit code: $RC"
    echo "    stdout: $(printf '%s' "$OUT" | head -c 2000)"
    echo "    stderr: $(printf '%s' "$ERR" | head -c 2000)"
}

expect_rc() {
    if [[ $RC == "$1" ]]; then
        pass
    else
        fail "$LABEL: exit code: expected $1, got $RC"
        show_last
    fi
}

expect_out() {
    if [[ $OUT == "$1" ]]; then
        pass
    else
        fail "$LABEL: stdout: expected [$1], got [$OUT]"
        show_last
    fi
}

expect_out_has() {
    if [[ $OUT == *"$1"* ]]; then
        pass
    else
        fail "$LABEL: stdout should contain [$1]"
        show_last
    fi
}

expect_err_has() {
    if [[ $ERR == *"$1"* ]]; then
        pass
    else
        fail "$LABEL: stderr should contain [$1]"
        show_last
    fi
}

# The error is one line, prefixed with the program name.
expect_err_line() {
    local prog=$1 text=$2
    if [[ $ERR == "$prog: "*"$text"* && $ERR != *$'\n'* ]]; then
        pass
    else
        fail "$LABEL: stderr should be one line \"$prog: ...$text...\""
        show_last
    fi
}

expect_out_empty() {
    if [[ -z $OUT ]]; then
        pass
    else
        fail "$LABEL: stdout should be empty, got [$OUT]"
        show_last
    fi
}

expect_faster_than() {
    if ((ELAPSED_MS < $1)); then
        pass
    else
        fail "$LABEL: took $ELAPSED_MS ms, expected under $1 ms"
    fi
}

# expect_json PYTHON_EXPR: stdout is JSON and PYTHON_EXPR holds for it, d
# being the parsed value (e.g. 'd["idade"] == 22').
expect_json() {
    if "$PY" -c '
import json, sys
d = json.loads(sys.argv[1])
sys.exit(0 if eval(sys.argv[2]) else 1)' "$OUT" "$1" 2>"$tmpdir/json.err"; then
        pass
    else
        fail "$LABEL: stdout should be JSON with: $1"
        show_last
        sed 's/^/    python: /' "$tmpdir/json.err" | tail -n 3
    fi
}

# check DESCRIPTION COMMAND...: passes when COMMAND succeeds.
check() {
    local what=$1
    shift
    if "$@"; then
        pass
    else
        fail "$what"
    fi
}

finish() {
    echo "$passed passed, $failed failed"
    ((failed == 0))
}

# --------------------------------------------------------------- running

# run CMD...: runs CMD in the foreground (stdin inherited), bounded by
# RUN_TIMEOUT; sets OUT, ERR (without trailing newlines), RC, ELAPSED_MS.
run() {
    local t0 t1
    LABEL="${1##*/}"
    if (($# > 1)); then
        LABEL+=" $(printf '%q ' "${@:2}")"
        LABEL=${LABEL% }
    fi
    t0=$(now_ms)
    timeout -k 5 "$RUN_TIMEOUT" "$@" >"$tmpdir/last.out" 2>"$tmpdir/last.err"
    RC=$?
    t1=$(now_ms)
    ELAPSED_MS=$((t1 - t0))
    OUT=$(cat "$tmpdir/last.out")
    ERR=$(cat "$tmpdir/last.err")
    if ((RC == 124)); then
        echo "NOTE: $LABEL was killed after ${RUN_TIMEOUT}s"
    fi
}

rpc() { run "$MQRPC_BIN/rpc_client" "$@"; }

# wait_for_line FILE TEXT [SECONDS]: until FILE contains TEXT.
wait_for_line() {
    local file=$1 text=$2 secs=${3:-$READY_TIMEOUT} i
    for ((i = 0; i < secs * 20; i++)); do
        grep -qF -- "$text" "$file" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# spawn NAME CMD...: starts CMD in the background (stdin from /dev/null),
# stdout to $tmpdir/NAME.out, stderr to $tmpdir/NAME.err; sets SPAWNED_PID.
spawn() {
    local name=$1
    shift
    "$@" >"$tmpdir/$name.out" 2>"$tmpdir/$name.err" </dev/null &
    SPAWNED_PID=$!
    spawned+=("$SPAWNED_PID")
}

# start_service NAME LABEL CMD...: spawns CMD and waits until it prints
# "[x] Serviço LABEL pronto...". Returns 1 (after a FAIL) if it does not.
start_service() {
    local name=$1 label=$2
    shift 2
    local i
    spawn "$name" "$@"
    for ((i = 0; i < READY_TIMEOUT * 20; i++)); do
        grep -qF -- "[x] Serviço $label pronto..." "$tmpdir/$name.out" && return 0
        kill -0 "$SPAWNED_PID" 2>/dev/null || break # died: no use waiting
        sleep 0.05
    done
    fail "$name (${1##*/}) did not get ready within ${READY_TIMEOUT}s"
    echo "    stdout: $(head -c 2000 "$tmpdir/$name.out")"
    echo "    stderr: $(head -c 2000 "$tmpdir/$name.err")"
    return 1
}

# delete_queues Q...: deletes the queues a test created (exit traps).
delete_queues() {
    (($#)) || return 0
    "$PY" - "$@" <<'EOF' >/dev/null 2>&1
import sys, mqrpc_pika
conn = mqrpc_pika.connect("services")
ch = conn.channel()
for q in sys.argv[1:]:
    ch.queue_delete(queue=q)
conn.close()
EOF
}

# ok DESCRIPTION 'SHELL TEST': passes when the test, evaluated, succeeds.
ok() {
    if eval "$2"; then pass; else fail "$LABEL: $1"; fi
}

# count_lines FILE TEXT: how many lines of FILE hold TEXT.
count_lines() { grep -cF -- "$2" "$1" 2>/dev/null || true; }

# start_poison_supervisor QUEUE MAX_DELIVERIES TRIES [ARGS...]: runs
# service_crash (with ARGS)
# (it dies on {"crash": true}) on QUEUE, starting it again each time it
# dies, at most TRIES times or until $tmpdir/poison.stop exists; output is
# appended to $tmpdir/poison.out and .err. Sets SUPERVISOR_PID; the
# supervisor is stopped with the others at exit.
start_poison_supervisor() {
    local queue=$1 max=$2 tries=$3
    local args=("${@:4}")
    : >"$tmpdir/poison.err"
    (
        ulimit -c 0
        for ((i = 0; i < tries; i++)); do
            [[ -e $tmpdir/poison.stop ]] && break
            "$MQRPC_BIN/service_crash" --queue "$queue" --max-deliveries "$max" "${args[@]}" \
                >>"$tmpdir/poison.out" 2>>"$tmpdir/poison.err" </dev/null &
            echo $! >"$tmpdir/poison.pid"
            wait $!
        done
    ) &
    SUPERVISOR_PID=$!
    spawned+=("$SUPERVISOR_PID")
}

# stop_pid PID [SECONDS]: SIGTERM, then waits (bounded) for the exit and
# sets STOP_RC to its exit status (or 124 if it had to be killed).
stop_pid() {
    kill -TERM "$1" 2>/dev/null
    wait_pid "$1" "${2:-10}"
    STOP_RC=$WAIT_RC
}

# wait_pid PID SECONDS: waits for a background process to exit by itself;
# sets WAIT_RC (124 if it did not exit in time; it is then killed).
wait_pid() {
    local pid=$1 secs=$2 i
    for ((i = 0; i < secs * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        WAIT_RC=124
    else
        wait "$pid"
        WAIT_RC=$?
    fi
    forget "$pid"
}

# queue_info QUEUE: prints "MESSAGES CONSUMERS" (ready messages, consumers)
# from a passive declare, as seen by pika; fails if the queue does not exist.
queue_info() {
    "$PY" - "$1" <<'EOF'
import sys, mqrpc_pika
conn = mqrpc_pika.connect("clients")
ok = conn.channel().queue_declare(queue=sys.argv[1], passive=True).method
print(ok.message_count, ok.consumer_count)
conn.close()
EOF
}

# wait_queue QUEUE "MESSAGES CONSUMERS" SECONDS: until queue_info says so;
# on failure prints what it saw last.
wait_queue() {
    local q=$1 want=$2 secs=$3 got='' i
    for ((i = 0; i < secs * 10; i++)); do
        got=$(queue_info "$q" 2>&1)
        [[ $got == "$want" ]] && return 0
        sleep 0.1
    done
    echo "    queue $q: expected [$want], got [$got]"
    return 1
}

if [[ ! -s $MQRPC_STATE_DIR/clients.url ]]; then
    echo "no $MQRPC_STATE_DIR/clients.url: is the test broker running?" >&2
    exit 1
fi
