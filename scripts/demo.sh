#!/usr/bin/env bash
# The demo: install missing packages, build, start the private broker and the
# services (service_soma twice), run the seed's four examples, show the
# round-robin between the two soma instances and two errors, then open the
# interactive menu when run from a terminal. Everything the demo started is
# stopped on exit (also on Ctrl-C); a broker that was already running is left
# running.
#
# Files: var/log/<service>-<n>.log (each service's output), var/<service>-<n>.pid.
# $MQRPC_STATE_DIR moves var/, as for scripts/broker.sh.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"
bin=$repo/build/bin
state=${MQRPC_STATE_DIR:-$repo/var}
# The programs find the broker's URL files there, whatever state directory
# build/ was configured with (MQRPC_STATE_DIR in CMake).
export MQRPC_STATE_DIR=$state
log_dir=$state/log
ready_timeout=15

# The demo talks to its private broker, found through var/*.url; an
# AMQP_URL from the environment would send the programs elsewhere.
unset AMQP_URL

step() { printf '\n==> %s\n' "$*"; }
die() {
    echo "demo: $*" >&2
    exit 1
}

# ---------------------------------------------------------------- cleanup
started_broker=0
pid_files=() # only the services this run started

pid_of() {
    local pid=""
    [[ -f "$1" ]] && read -r pid <"$1" 2>/dev/null
    [[ "$pid" =~ ^[0-9]+$ ]] && echo "$pid"
    return 0
}

alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

cleanup() {
    local f pid i any
    trap - EXIT INT TERM
    set +e
    if ((${#pid_files[@]})); then
        step "stopping the services"
        # SIGTERM to all first, so they stop in parallel.
        for f in "${pid_files[@]}"; do
            pid=$(pid_of "$f")
            alive "$pid" && kill -TERM "$pid" 2>/dev/null
        done
        for ((i = 0; i < 50; i++)); do
            any=0
            for f in "${pid_files[@]}"; do
                alive "$(pid_of "$f")" && any=1
            done
            ((any)) || break
            sleep 0.1
        done
        for f in "${pid_files[@]}"; do
            pid=$(pid_of "$f")
            if alive "$pid"; then
                echo "demo: pid $pid ignored SIGTERM for 5 s: SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null
            fi
            rm -f "$f"
        done
        echo "stopped ${#pid_files[@]} services (logs in ${log_dir#"$repo"/})"
    fi
    if ((started_broker)); then
        step "stopping the broker the demo started"
        scripts/broker.sh stop
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ build
step "dependencies and build"
scripts/deps.sh
[ -f build/CMakeCache.txt ] || cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMQRPC_WERROR=ON \
    -DMQRPC_STATE_DIR="$repo/var"
# Only what the demo runs: a test that does not compile must not stop it.
cmake --build build -j"$(nproc)" --target rpc_client service_soma service_media \
    service_busca service_info

# ----------------------------------------------------------------- broker
step "private broker (scripts/broker.sh start)"
if ! scripts/broker.sh status >/dev/null 2>&1; then
    started_broker=1
fi
scripts/broker.sh start

# --------------------------------------------------------------- services
step "services (one per terminal in the seed; here in the background)"
mkdir -p "$log_dir"

start_service() { # name n
    local name=$1 n=$2 pid_file=$state/$1-$2.pid log=$log_dir/$1-$2.log pid
    pid=$(pid_of "$pid_file")
    if alive "$pid"; then
        die "$name-$n is already running (pid $pid, $pid_file): is another demo running?"
    fi
    "$bin/$name" </dev/null >"$log" 2>&1 &
    echo $! >"$pid_file"
    pid_files+=("$pid_file")
}

wait_ready() { # name n
    local name=$1 n=$2 log=$log_dir/$1-$2.log pid line deadline
    pid=$(pid_of "$state/$name-$n.pid")
    deadline=$((SECONDS + ready_timeout))
    while :; do
        if line=$(grep -m1 -a 'pronto\.\.\.' "$log" 2>/dev/null); then
            printf '%-16s %s\n' "$name-$n:" "$line"
            return 0
        fi
        if ! alive "$pid"; then
            echo "demo: $name-$n (pid $pid) exited before it was ready:" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "demo: $name-$n not ready after ${ready_timeout} s:" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
}

services=(service_soma:1 service_soma:2 service_media:1 service_busca:1 service_info:1)
for s in "${services[@]}"; do start_service "${s%%:*}" "${s##*:}"; done
for s in "${services[@]}"; do wait_ready "${s%%:*}" "${s##*:}"; done

# ------------------------------------------------------------------ calls
# Prints an argument list the way a user would type it.
show() {
    local out="" a
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=@+-]+$ ]]; then
            out+=" $a"
        else
            out+=" '${a//\'/\'\\\'\'}'"
        fi
    done
    echo "\$ rpc_client${out}"
}

client() {
    local rc=0
    show "$@"
    "$bin/rpc_client" "$@" </dev/null 2>&1 || rc=$?
    ((rc == 0)) || echo "(exit code $rc)"
}

step "the seed's four examples"
client -v soma 10 5
client -v media 10 20 30 40
client -v busca joao
client -v info

step "round-robin: prefetch 1, two service_soma instances take turns"
for _ in 1 2 3 4; do client -v soma 1 2; done

step "errors: an error reply (exit 1) and no service on the queue (exit 5)"
client busca maria
client call nobody '{}'

# ------------------------------------------------------------------- menu
if [ -t 0 ] && [ -t 1 ]; then
    step "interactive menu (build/bin/rpc_client): type 0, q or Ctrl-D to quit"
    "$bin/rpc_client" || true
else
    step "interactive menu skipped: stdin or stdout is not a terminal (run build/bin/rpc_client yourself)"
fi
