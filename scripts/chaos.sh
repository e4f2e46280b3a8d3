#!/usr/bin/env bash
# The chaos run: calls under load while service instances die and the broker
# restarts, and a check that no call is lost, duplicated or answered wrongly.
#
#   scripts/chaos.sh [--quick] [--cluster] [--calls N] [--rate N]
#                    [--max-seconds S] [--restart-after S]
#
# Builds an ASan/UBSan Debug tree in build-chaos/ (or uses the tree named by
# $MQRPC_CHAOS_BUILD, without building), starts a private broker of its own
# (state in $MQRPC_CHAOS_DIR, default build-chaos/var; port $MQRPC_CHAOS_PORT,
# default 5712), 3 instances of each of the 4 services (--durable), and
# rpc_chaos (--calls calls, at most --rate calls/s, --durable, its default
# timeout and retries).
# Meanwhile, every 0.3-1.0 s it SIGKILLs a random instance and restarts it
# 0-1 s later; instances that exit by themselves (broker down) are restarted
# too, at most once per 0.5 s each. Once, --restart-after seconds in, it
# restarts the broker (its state, hence durable queues, kept), telling
# rpc_chaos with SIGUSR1 before and SIGUSR2 once the broker is up.
# When rpc_chaos is done: every instance gets SIGTERM, the broker stops, and
# the figures are printed: rpc_chaos's, instances killed and restarted,
# broker restarts, requests each service answered (from the logs).
# Every instance logs to its own file under <dir>/log; any sanitizer report
# in any log fails the run. Exit status: rpc_chaos's (0: no call lost,
# duplicated or answered wrongly), or 1 on sanitizer reports or a failure
# of the script itself.
#
# --cluster: the broker is a cluster of three nodes (MQRPC_BROKER_NODES=3:
# ports $MQRPC_CHAOS_PORT, +2, +4; state in build-chaos/var-cluster unless
# $MQRPC_CHAOS_DIR), the services use quorum queues (--queue-type quorum)
# and every program gets the address list of all nodes. Instead of the
# broker restart, every 5-10 s a random node is SIGKILLed (broker.sh kill)
# and started again 2-6 s later (broker.sh start-node); the next kill waits
# until it is back, so never two nodes are down at once. rpc_chaos gets
# SIGRTMIN at each kill and prints the gap in answers after it (the goal:
# answers resume within 5 s).
#
# --quick: 5000 calls at 400 calls/s (about 12 s, so the broker restart
# after 5 s falls at about 40% of the run), at most 300 s of sending.
# Defaults: 100000 calls as fast as they are answered (about 40 s on the
# 2-core VM with sanitizers), restart after 20 s, at most 900 s.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"

usage() {
    echo "usage: ${0##*/} [--quick] [--cluster] [--calls N] [--rate N]" \
        "[--max-seconds S] [--restart-after S]"
}
die() {
    echo "chaos: $*" >&2
    exit 1
}
say() { printf '==> %s\n' "$*" >&2; }

quick=0 cluster=0 calls='' rate='' max_seconds='' restart_after=''
while (($#)); do
    case $1 in
    --quick) quick=1 ;;
    --cluster) cluster=1 ;;
    --calls | --rate | --max-seconds | --restart-after)
        if [[ ! ${2:-} =~ ^[0-9]+$ ]] || { [[ $1 != --rate ]] && (($2 == 0)); }; then
            usage >&2
            echo "chaos: $1 takes a whole number (0 only for --rate: no limit)" >&2
            exit 2
        fi
        case $1 in
        --calls) calls=$2 ;;
        --rate) rate=$2 ;;
        --max-seconds) max_seconds=$2 ;;
        --restart-after) restart_after=$2 ;;
        esac
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
    shift
done
if ((quick)); then
    : "${calls:=5000}" "${rate:=400}" "${max_seconds:=300}" "${restart_after:=5}"
else
    : "${calls:=100000}" "${rate:=0}" "${max_seconds:=900}" "${restart_after:=20}"
fi

readonly SERVICES=(soma media busca info)
readonly INSTANCES=3
readonly CALL_TIMEOUT_S=30 # rpc_chaos's default --timeout
# Wanted from the services; dropped (with a warning) while they do not
# take it yet.
wanted_service_args=(--durable)
nodes=1
if ((cluster)); then
    nodes=3
    wanted_service_args+=(--queue-type)
fi

default_dir=$repo/build-chaos/var
((cluster)) && default_dir=$repo/build-chaos/var-cluster
dir=${MQRPC_CHAOS_DIR:-$default_dir}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd -P)
export MQRPC_STATE_DIR=$dir
export MQRPC_BROKER_PORT=${MQRPC_CHAOS_PORT:-5712}
export MQRPC_BROKER_MANAGEMENT=0
export MQRPC_BROKER_NODES=$nodes
unset AMQP_URL MQRPC_BROKER_NODE
# A sanitizer report ends the process that made it (halt_on_error) and stays
# in its log, which is scanned at the end.
export ASAN_OPTIONS=abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
logs=$dir/chaos-logs
broker=$repo/scripts/broker.sh

# ------------------------------------------------------- processes we own
chaos_pid=''
restart_pid='' # the background broker restart
restart_started=0
started_broker=0
slot_name=() slot_pid=() slot_started=() slot_restart_at=()
killed=0 restarts=0 exited=0 broker_restarts=0
# --cluster: the node down (0: none), when it comes back, its start-node
node_down=0 node_back_at=0 node_start_pid='' node_kills=0 next_node_kill=0
now=0

# tick: sets now, in ms of the wall clock, without a subshell.
tick() {
    local us=${EPOCHREALTIME//[!0-9]/}
    now=$((us / 1000))
}

# alive PID PROGRAM: PID runs PROGRAM. The check on the program keeps a
# reaped PID that the system gave to someone else from looking like ours.
alive() {
    [[ -n $1 && $1 != 0 ]] || return 1
    [[ $(readlink "/proc/$1/exe" 2>/dev/null) == "$2" ]]
}

slot_prog() { echo "$bin/service_${slot_name[$1]%-*}"; }

stop_services() {
    local s pid i any
    for s in "${!slot_pid[@]}"; do
        pid=${slot_pid[$s]}
        if alive "$pid" "$(slot_prog "$s")"; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    # ASan's leak check runs at exit: give them time.
    for ((i = 0; i < 150; i++)); do
        any=0
        for s in "${!slot_pid[@]}"; do
            if alive "${slot_pid[$s]}" "$(slot_prog "$s")"; then any=1; fi
        done
        ((any)) || break
        sleep 0.1
    done
    for s in "${!slot_pid[@]}"; do
        pid=${slot_pid[$s]}
        if alive "$pid" "$(slot_prog "$s")"; then
            echo "chaos: ${slot_name[$s]} (pid $pid) ignored SIGTERM: killed" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        slot_pid[s]=0
    done
}

# shellcheck disable=SC2317 # called from the EXIT trap
stop_chaos_client() {
    local i
    [[ -n $chaos_pid ]] || return 0
    if kill -0 "$chaos_pid" 2>/dev/null; then
        kill -TERM "$chaos_pid" 2>/dev/null
        for ((i = 0; i < 50; i++)); do
            kill -0 "$chaos_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$chaos_pid" 2>/dev/null
    fi
    wait "$chaos_pid" 2>/dev/null
    chaos_pid=''
}

# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
    trap - EXIT INT TERM
    set +e
    stop_chaos_client
    if [[ -n $restart_pid ]]; then
        # bounded by its own timeout; stopping the broker mid-start could
        # leave a node behind
        wait "$restart_pid" 2>/dev/null
    fi
    if [[ -n $node_start_pid ]]; then
        wait "$node_start_pid" 2>/dev/null
    fi
    stop_services
    if ((started_broker)); then
        timeout 120 "$broker" stop >>"$logs/broker.log" 2>&1 ||
            echo "chaos: the broker did not stop; see $logs/broker.log" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ build
if [[ -n ${MQRPC_CHAOS_BUILD:-} ]]; then
    bin=$(cd "$MQRPC_CHAOS_BUILD/bin" 2>/dev/null && pwd -P) ||
        die "no $MQRPC_CHAOS_BUILD/bin (MQRPC_CHAOS_BUILD names a built tree)"
else
    out=$repo/build-chaos
    "$repo/scripts/deps.sh"
    say "building Debug with ASan + UBSan into build-chaos/"
    mkdir -p "$out"
    cmake -S "$repo" -B "$out" -DCMAKE_BUILD_TYPE=Debug -DMQRPC_SANITIZE=ON -DMQRPC_WERROR=ON \
        -DMQRPC_STATE_DIR="$repo/var" \
        >"$out/chaos-cmake.log" 2>&1 || {
        tail -n 30 "$out/chaos-cmake.log" >&2
        die "cmake failed"
    }
    cmake --build "$out" -j"$(nproc)" --target rpc_chaos \
        "${SERVICES[@]/#/service_}" >"$out/chaos-make.log" 2>&1 || {
        tail -n 30 "$out/chaos-make.log" >&2
        die "build failed"
    }
    bin=$out/bin
fi
for p in rpc_chaos "${SERVICES[@]/#/service_}"; do
    [[ -x $bin/$p ]] || die "$bin/$p is missing: build the tree first"
done

# The URL file, named: broker.sh stop deletes it, and a service started
# while the broker is down would otherwise fall back to the default URL
# (amqp://guest:guest@localhost:5672/, perhaps another broker) instead of
# failing, to be restarted.
service_args=(--url-file "$dir/services.url")
service_help=$("$bin/service_soma" --help 2>&1) || true
for a in "${wanted_service_args[@]}"; do
    if [[ $a == --queue-type ]]; then
        # no quietly classic queues on a cluster run
        [[ $service_help == *"--queue-type "* ]] ||
            die "the services do not take --queue-type (quorum queues) yet"
        service_args+=(--queue-type quorum)
    elif [[ $service_help == *"$a "* ]]; then
        service_args+=("$a")
    else
        echo "chaos: WARNING: the services do not take $a yet: running" \
            "without it" >&2
    fi
done

# ----------------------------------------------------------------- broker
if "$broker" status >/dev/null 2>&1; then
    die "a broker already runs in $dir (another chaos run?); stop it with" \
        "MQRPC_STATE_DIR=$dir MQRPC_BROKER_PORT=$MQRPC_BROKER_PORT $broker stop"
fi
# Every run starts from empty queues: durable requests of an earlier run
# would otherwise be served, and queues declared with other arguments
# refuse the services. The credentials stay, so the URL files do too.
rm -rf "$dir"/broker/mnesia "$dir"/broker-[0-9]/mnesia "$logs"
mkdir -p "$logs"
say "starting the broker ($nodes node(s), port $MQRPC_BROKER_PORT, state in $dir)"
started_broker=1
timeout 240 "$broker" start >>"$logs/broker.log" 2>&1 || {
    tail -n 20 "$logs/broker.log" >&2
    die "the broker did not start"
}

# --------------------------------------------------------------- services
# start_slot S: starts instance S, appending to its own log.
start_slot() {
    local s=$1 name=${slot_name[$1]}
    tick
    echo "=== $(date +%T.%3N) start" >>"$logs/$name.log"
    "$(slot_prog "$s")" "${service_args[@]}" >>"$logs/$name.log" 2>&1 \
        </dev/null &
    slot_pid[s]=$!
    # Out of the job table: the shell then reaps it by itself and does not
    # announce each SIGKILL; alive() checks it by PID and program.
    disown "$!"
    slot_started[s]=$now
    slot_restart_at[s]=0
}

s=0
for svc in "${SERVICES[@]}"; do
    for ((i = 1; i <= INSTANCES; i++)); do
        slot_name[s]=$svc-$i
        start_slot "$s"
        s=$((s + 1))
    done
done
say "started ${#slot_name[@]} service instances: ${service_args[*]}"
for ((w = 0; w < 600; w++)); do
    ready=0
    for s in "${!slot_name[@]}"; do
        if grep -q "pronto" "$logs/${slot_name[$s]}.log"; then
            ready=$((ready + 1))
        fi
    done
    ((ready == ${#slot_name[@]})) && break
    sleep 0.05
done
if ((ready < ${#slot_name[@]})); then
    tail -n 5 "$logs"/*-[0-9].log >&2
    die "only $ready of ${#slot_name[@]} instances got ready in 30 s"
fi

# ------------------------------------------------------------ chaos loop
rand_between() { echo $(($1 + RANDOM % ($2 - $1 + 1))); }

# kill_one: SIGKILLs a random running instance, to be restarted 0-1 s later.
kill_one() {
    local up=() s
    for s in "${!slot_name[@]}"; do
        if ((slot_restart_at[s] == 0)) &&
            alive "${slot_pid[$s]}" "$(slot_prog "$s")"; then
            up+=("$s")
        fi
    done
    ((${#up[@]})) || return 0
    s=${up[RANDOM % ${#up[@]}]}
    kill -KILL "${slot_pid[$s]}" 2>/dev/null || return 0
    echo "=== $(date +%T.%3N) SIGKILL by chaos.sh" >>"$logs/${slot_name[$s]}.log"
    killed=$((killed + 1))
    slot_pid[s]=0
    slot_restart_at[s]=$((now + $(rand_between 0 1000)))
}

# supervise: restarts what is due: killed instances after their delay,
# instances that exited by themselves at once; each at most every 0.5 s.
supervise() {
    local s
    for s in "${!slot_name[@]}"; do
        if ((slot_pid[s] != 0)); then
            alive "${slot_pid[$s]}" "$(slot_prog "$s")" && continue
            exited=$((exited + 1))
            slot_pid[s]=0
            slot_restart_at[s]=$now
        fi
        ((slot_restart_at[s] != 0 && now >= slot_restart_at[s])) || continue
        ((now - slot_started[s] >= 500)) || continue
        start_slot "$s"
        restarts=$((restarts + 1))
    done
}

# restart_broker: stop + start on the same state directory (durable queues
# survive), in the background, so that instances keep being killed and
# restarted while the broker is down. rpc_chaos gets SIGUSR1 before and
# SIGUSR2 once the broker is up again.
restart_broker() {
    say "restarting the broker"
    echo "=== $(date +%T.%3N) restart" >>"$logs/broker.log"
    (
        kill -USR1 "$chaos_pid" 2>/dev/null || true
        timeout 180 "$broker" restart >>"$logs/broker.log" 2>&1 || exit 1
        kill -USR2 "$chaos_pid" 2>/dev/null || true
    ) &
    restart_pid=$!
}

# restart_done: once the background restart has finished, checks it.
restart_done() {
    if [[ -z $restart_pid ]] || kill -0 "$restart_pid" 2>/dev/null; then
        return 0
    fi
    local rc=0
    wait "$restart_pid" || rc=$?
    restart_pid=''
    if ((rc != 0)); then
        tail -n 20 "$logs/broker.log" >&2
        die "the broker did not restart"
    fi
    broker_restarts=$((broker_restarts + 1))
    say "broker up again"
}

# --cluster: kill_node SIGKILLs a random node and marks it for rpc_chaos;
# node_cycle starts it again when due (in the background: a start takes
# seconds) and plans the next kill once it is back.
kill_node() {
    local n=$((1 + RANDOM % nodes))
    echo "=== $(date +%T.%3N) kill node $n" >>"$logs/broker.log"
    "$broker" kill "$n" >>"$logs/broker.log" 2>&1 || die "broker.sh kill $n failed"
    kill -s RTMIN "$chaos_pid" 2>/dev/null || true
    node_kills=$((node_kills + 1))
    say "$(((now - t0) / 1000)) s: SIGKILL node $n"
    node_down=$n
    node_back_at=$((now + $(rand_between 2000 6000)))
}
node_cycle() {
    if ((node_down == 0)); then
        if ((now >= next_node_kill)); then kill_node; fi
        return 0
    fi
    if [[ -z $node_start_pid ]]; then
        ((now >= node_back_at)) || return 0
        echo "=== $(date +%T.%3N) start node $node_down" >>"$logs/broker.log"
        timeout 180 "$broker" start-node "$node_down" >>"$logs/broker.log" 2>&1 &
        node_start_pid=$!
        return 0
    fi
    kill -0 "$node_start_pid" 2>/dev/null && return 0
    local rc=0
    wait "$node_start_pid" || rc=$?
    node_start_pid=''
    if ((rc != 0)); then
        tail -n 20 "$logs/broker.log" >&2
        die "node $node_down did not start again"
    fi
    say "$(((now - t0) / 1000)) s: node $node_down back"
    node_down=0
    next_node_kill=$((now + $(rand_between 5000 10000)))
}

pace="as fast as answered"
((rate == 0)) || pace="at most $rate calls/s"
if ((cluster)); then
    say "rpc_chaos: $calls calls $pace, for at most $max_seconds s; killing" \
        "instances and nodes"
else
    say "rpc_chaos: $calls calls $pace, for at most $max_seconds s; killing" \
        "instances; broker restart after $restart_after s"
fi
"$bin/rpc_chaos" --calls "$calls" --rate "$rate" --max-seconds "$max_seconds" --durable \
    --report "$dir/report.json" -v >"$dir/rpc_chaos.out" \
    2>"$logs/rpc_chaos.log" </dev/null &
chaos_pid=$!

tick
t0=$now
next_kill=$((now + $(rand_between 300 1000)))
next_note=$((now + 10000))
next_node_kill=$((now + $(rand_between 5000 10000)))
# rpc_chaos stops by itself; this bound only catches a hang.
hard_stop=$((now + (max_seconds + CALL_TIMEOUT_S + 120) * 1000))
while kill -0 "$chaos_pid" 2>/dev/null; do
    tick
    if ((now >= hard_stop)); then
        die "rpc_chaos did not finish in $(((hard_stop - t0) / 1000)) s"
    fi
    if ((cluster)); then
        node_cycle
    elif ((!restart_started && now - t0 >= restart_after * 1000)); then
        restart_started=1
        restart_broker
    fi
    restart_done
    if ((now >= next_kill)); then
        kill_one
        next_kill=$((now + $(rand_between 300 1000)))
    fi
    supervise
    if ((now >= next_note)); then
        say "$(((now - t0) / 1000)) s: killed $killed, restarted $restarts;" \
            "$(grep '^rpc_chaos: [0-9]' "$logs/rpc_chaos.log" | tail -n 1 || true)"
        next_note=$((now + 10000))
    fi
    sleep 0.05
done
chaos_rc=0
wait "$chaos_pid" || chaos_rc=$?
chaos_pid=''
# A restart still under way when rpc_chaos finished (a short run).
for ((i = 0; i < 2000; i++)); do
    restart_done
    [[ -n $restart_pid ]] || break
    sleep 0.1
done
# A node start still under way, or a node still down: all back before the
# stop, so that the stop finds the cluster whole.
if ((cluster)); then
    for ((i = 0; i < 2000 && node_down != 0; i++)); do
        tick
        node_back_at=0
        next_node_kill=$((now + 3600000))
        node_cycle
        sleep 0.1
    done
fi

# ------------------------------------------------------------- the end
stop_services
timeout 120 "$broker" stop >>"$logs/broker.log" 2>&1 ||
    echo "chaos: the broker did not stop; see $logs/broker.log" >&2
started_broker=0

echo
cat "$dir/rpc_chaos.out"
grep -v '^rpc_chaos: [0-9]' "$logs/rpc_chaos.log" >&2 || true
echo "instances killed: $killed"
echo "instances restarted: $restarts ($exited exited by themselves)"
if ((cluster)); then
    echo "node kills: $node_kills (each node started again)"
else
    echo "broker restarts: $broker_restarts"
fi
# service_main prints "<instance>: stopped after answering N requests (...
# counters)" on SIGTERM; a SIGKILLed instance prints nothing, so these are
# the counts of the instances running at the end.
service_counters() {
    awk '
    function take(re, skip) {
        if (match($0, re)) return substr($0, RSTART + skip, RLENGTH - skip) + 0
        return -1
    }
    function add(name, v) { if (v >= 0) { sum[name] += v; seen[name] = 1 } }
    /stopped after answering/ {
        stops++
        add("answered", take("answering [0-9]+", 10))
        add("skipped", take("[0-9]+ skipped", 0))
        add("requeued", take("[0-9]+ requeued", 0))
        add("dead-lettered", take("[0-9]+ dead-lettered", 0))
        add("connection lost", take("lost [0-9]+", 5))
        add("regained", take("regained [0-9]+", 9))
    }
    END {
        printf "answered %d", sum["answered"]
        split("skipped,requeued,dead-lettered,connection lost,regained", k, ",")
        for (i = 1; i <= 5; i++)
            if (seen[k[i]]) printf ", %s %d", k[i], sum[k[i]]
        printf " (%d instances stopped cleanly)\n", stops
    }' "$@"
}
for svc in "${SERVICES[@]}"; do
    echo "service_$svc: $(service_counters "$logs/$svc"-[0-9]*.log)"
done
echo "report: $dir/report.json, logs: $logs"

status=$chaos_rc
mapfile -t hits < <(grep -l -E \
    'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' "$logs"/*.log)
if ((${#hits[@]})); then
    echo "chaos: FAILED: sanitizer reports in:" >&2
    printf '  %s\n' "${hits[@]}" >&2
    ((status != 0)) || status=1
else
    echo "sanitizers: clean (${#slot_name[@]} instance logs and rpc_chaos)"
fi
((chaos_rc == 0)) || echo "chaos: FAILED: rpc_chaos exited with $chaos_rc" >&2
exit "$status"
