#!/usr/bin/env bash
# Run a private RabbitMQ node for mqrpc (demo and tests), isolated from the
# system rabbitmq-server service: own node name, own ports, own epmd, own
# state directory. Only /usr/lib/rabbitmq/bin/* is used because those scripts
# run as the caller and honour RABBITMQ_* variables (the /usr/sbin wrappers
# switch user and would touch the system installation).
#
# Usage: scripts/broker.sh start|stop|status|restart|rotate|pid|url [clients|services]|--help
#        scripts/broker.sh ctl RABBITMQCTL-ARGS...
#        scripts/broker.sh kill N|start-node N       (cluster fault tests)
#
# Accounts (no guest): "services" may declare and consume only queues named
# service_*, "clients" may publish requests and use their own server-named
# reply queues, "admin" is for the management UI only. Passwords are random,
# kept in <state>/broker/credentials (mode 600) and in the URL files
# <state>/clients.url and <state>/services.url (mode 600), never printed.
# "rotate" gives the accounts new passwords while the broker runs.
#
# Environment (all optional):
#   MQRPC_STATE_DIR              state directory (default: <repo>/var)
#   MQRPC_BROKER_PORT            AMQP port (default 5682)
#   MQRPC_MGMT_PORT              management HTTP port (default AMQP+10000)
#   MQRPC_DIST_PORT              Erlang distribution port (default AMQP+20000)
#   MQRPC_EPMD_PORT              private epmd port (default AMQP-1000)
#   MQRPC_BROKER_MANAGEMENT      1 = enable management plugin (default), 0 = off
#   MQRPC_PROMETHEUS_PORT        RabbitMQ's own Prometheus endpoint (plugin
#                                rabbitmq_prometheus, on 127.0.0.1, per-queue
#                                metrics; URL in <state>/prometheus_url, one
#                                line per node; default AMQP+10010: 15692 for
#                                5682; node n of a cluster: +2(n-1))
#   MQRPC_BROKER_PROMETHEUS      1 = enable that endpoint (default), 0 = off
#   MQRPC_BROKER_START_TIMEOUT   seconds to wait for readiness (default 60,
#                                120 for a cluster)
#   MQRPC_BROKER_TLS             1 = also listen with TLS (mutual: client
#                                certificate required) and write amqps://
#                                URL files; CA and certificates are generated
#                                with openssl into <state>/tls (default 0)
#   MQRPC_BROKER_TLS_PORT        TLS port (default AMQP+1)
#   MQRPC_BROKER_CONSUMER_TIMEOUT_MS
#                                the broker's consumer_timeout: how long a
#                                service may hold a request unacknowledged,
#                                so the longest a handler may run (default
#                                1800000, RabbitMQ's own 30 minutes)
#   MQRPC_BROKER_NODES           nodes of the broker: 1 (default, one node as
#                                always) or 2-7, a cluster (below). Unset, the
#                                count of the last "start" in this state
#                                directory is used, so stop/status/url/ctl need
#                                not repeat it.
#   MQRPC_BROKER_NODE            the node "ctl" and "pid" address (default 1)
#
# Cluster mode (MQRPC_BROKER_NODES=3 scripts/broker.sh start): N nodes of one
# RabbitMQ cluster on this machine, all on 127.0.0.1, with the same accounts
# and permissions (the cluster shares them), one Erlang cookie
# (<state>/broker/home/.erlang.cookie) and the one private epmd. Node n
# (1-based) has, with P = MQRPC_BROKER_PORT:
#   node name    mqrpc<AMQP port of node n>@localhost
#   AMQP         P + 2(n-1)         (5682, 5684, 5686 by default)
#   TLS          AMQP port + 1      (5683, 5685, 5687; MQRPC_BROKER_TLS_PORT
#                                    moves node 1's, the others follow by 2)
#   distribution AMQP port + 20000  (25682, 25684, 25686)
#   epmd         P - 1000, shared   (4682)
#   management   P + 10000, node 1 only (15682; the others run its agent)
#   state        <state>/broker (node 1), <state>/broker-n (n >= 2)
#   PID file     <state>/broker.pid (node 1), <state>/broker-n.pid
# The AMQP ports step by 2 so that every node's TLS port stays AMQP+1, as
# with one node. Nodes 2..N join node 1 (join_cluster) on their first start;
# later starts find each other by themselves. The URL files list every node,
# comma-separated, node 1 first. Each node's config bounds its quorum
# write-ahead log (raft.wal_max_size_bytes, 64 MiB) and its memory watermark
# (vm_memory_high_watermark.absolute, 1 GiB): three nodes on a small machine.
# Changing the node count of a state directory wipes its queues (the nodes'
# databases); the credentials stay.
#   kill N        SIGKILL node N's Erlang VM (a crash, for fault tests)
#   start-node N  start node N again; it rejoins the cluster
#   status        one line per node, running or not; exit 3 if any is down
# Which node leads a quorum queue (the one whose loss costs an election):
#   scripts/broker.sh ctl list_queues name type leader members
# (RabbitMQ 3.10: the "leader" column; rabbitmq-queues quorum_status NAME
# shows every member's Raft state).
#
# Exit codes: 0 ok, 1 error, 2 usage error,
#             3 not running (status/url; LSB convention for "program is not running").
set -euo pipefail

readonly RMQ_BIN=/usr/lib/rabbitmq/bin
readonly EXIT_NOT_RUNNING=3

usage() {
    echo "usage: ${0##*/} start|stop|status|restart|rotate|pid|url [clients|services]|--help"
    echo "       ${0##*/} ctl RABBITMQCTL-ARGS..."
    echo "       ${0##*/} kill N|start-node N"
}

# --help: the usage and the environment, from the header of this file.
help_text() {
    usage
    echo
    sed -n '/^# Accounts/,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

die() {
    echo "broker: $*" >&2
    exit 1
}

is_uint() {
    [[ "$1" =~ ^[0-9]+$ ]]
}

# Resolve the repo from the script location so a clone anywhere works.
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo_dir=$(cd "$script_dir/.." && pwd -P)

# ---------------------------------------------------------------------------
# Configuration and environment: one place, used by every subcommand, so that
# the server and every rabbitmqctl call agree on node name, cookie and epmd.
# ---------------------------------------------------------------------------
setup_env() {
    state_dir=${MQRPC_STATE_DIR:-$repo_dir/var}
    mkdir -p "$state_dir" || die "cannot create state dir $state_dir"
    state_dir=$(cd "$state_dir" && pwd -P)

    base_port=${MQRPC_BROKER_PORT:-5682}
    is_uint "$base_port" || die "MQRPC_BROKER_PORT must be a number, got '$base_port'"
    # Derived ports keep parallel brokers (demo, tests) from colliding as long
    # as their AMQP ports differ.
    mgmt_port=${MQRPC_MGMT_PORT:-$((base_port + 10000))}
    base_dist_port=${MQRPC_DIST_PORT:-$((base_port + 20000))}
    epmd_port=${MQRPC_EPMD_PORT:-$((base_port - 1000))}
    base_prom_port=${MQRPC_PROMETHEUS_PORT:-$((base_port + 10010))}
    local p
    for p in "$mgmt_port" "$base_dist_port" "$epmd_port" "$base_prom_port"; do
        is_uint "$p" || die "port settings must be numbers, got '$p'"
    done
    for p in "$base_port" "$mgmt_port" "$base_dist_port" "$epmd_port" "$base_prom_port"; do
        ((p >= 1 && p <= 65535)) || die "port $p out of range (check MQRPC_*_PORT)"
    done
    management=${MQRPC_BROKER_MANAGEMENT:-1}
    [[ "$management" == 0 || "$management" == 1 ]] ||
        die "MQRPC_BROKER_MANAGEMENT must be 0 or 1, got '$management'"
    prometheus=${MQRPC_BROKER_PROMETHEUS:-1}
    [[ "$prometheus" == 0 || "$prometheus" == 1 ]] ||
        die "MQRPC_BROKER_PROMETHEUS must be 0 or 1, got '$prometheus'"
    tls=${MQRPC_BROKER_TLS:-0}
    [[ "$tls" == 0 || "$tls" == 1 ]] || die "MQRPC_BROKER_TLS must be 0 or 1, got '$tls'"
    base_tls_port=${MQRPC_BROKER_TLS_PORT:-$((base_port + 1))}
    is_uint "$base_tls_port" && ((base_tls_port >= 1 && base_tls_port <= 65535)) ||
        die "MQRPC_BROKER_TLS_PORT must be a port number, got '$base_tls_port'"
    consumer_timeout=${MQRPC_BROKER_CONSUMER_TIMEOUT_MS:-1800000}
    is_uint "$consumer_timeout" && ((consumer_timeout >= 1)) ||
        die "MQRPC_BROKER_CONSUMER_TIMEOUT_MS must be a number of milliseconds, got '$consumer_timeout'"

    # Shared by every node of a cluster: node 1's directory holds them.
    shared_dir=$state_dir/broker
    clients_url_file=$state_dir/clients.url
    services_url_file=$state_dir/services.url
    mgmt_url_file=$state_dir/management_url
    prom_url_file=$state_dir/prometheus_url
    cred_file=$shared_dir/credentials
    definitions_file=$shared_dir/definitions.json
    nodes_file=$shared_dir/nodes
    tls_dir=$state_dir/tls

    # The node count: asked for, else the one this state directory last
    # started with, else 1.
    recorded_nodes=1
    if [[ -s "$nodes_file" ]]; then
        read -r recorded_nodes <"$nodes_file" || true
        is_uint "${recorded_nodes:-x}" || recorded_nodes=1
    fi
    nodes=${MQRPC_BROKER_NODES:-$recorded_nodes}
    [[ "$nodes" =~ ^[1-7]$ ]] || die "MQRPC_BROKER_NODES must be 1 to 7, got '$nodes'"
    for p in $((base_port + 2 * (nodes - 1))) $((base_tls_port + 2 * (nodes - 1))) \
        $((base_dist_port + 2 * (nodes - 1))); do
        ((p <= 65535)) || die "port $p of node $nodes out of range (check MQRPC_*_PORT)"
    done

    start_timeout=${MQRPC_BROKER_START_TIMEOUT:-$((nodes > 1 ? 120 : 60))}
    is_uint "$start_timeout" || die "MQRPC_BROKER_START_TIMEOUT must be a number of seconds"

    # Drop any RABBITMQ_* inherited from the caller (e.g. RABBITMQ_LOGS,
    # RABBITMQ_MNESIA_DIR) so they cannot redirect our node into shared paths.
    local v
    for v in $(compgen -e); do
        if [[ "$v" == RABBITMQ_* ]]; then unset "$v"; fi
    done
    # The Erlang cookie lives in $HOME; a private HOME avoids sharing (or
    # clobbering) the user's ~/.erlang.cookie. One HOME for every node of a
    # cluster: one cookie, which nodes and CLI tools must share.
    export HOME=$shared_dir/home
    # A private epmd, one for all nodes (they find each other through it):
    # the system one (4369) belongs to the system service.
    export ERL_EPMD_PORT=$epmd_port
    export ERL_EPMD_ADDRESS=127.0.0.1
    # Without this the distribution listener binds to 0.0.0.0.
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    # The CLI tools also open a distribution listener (ports 35672-35682).
    export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    select_node 1
}

node_name() {
    echo "mqrpc$((base_port + 2 * ($1 - 1)))@localhost"
}

# select_node N: makes node N (1-based) the one the helpers below act on.
# Node 1's names and paths are those of the single node.
select_node() {
    node_index=$1
    amqp_port=$((base_port + 2 * (node_index - 1)))
    tls_port=$((base_tls_port + 2 * (node_index - 1)))
    dist_port=$((base_dist_port + 2 * (node_index - 1)))
    prom_port=$((base_prom_port + 2 * (node_index - 1)))
    node=$(node_name "$node_index")
    if ((node_index == 1)); then
        broker_dir=$state_dir/broker
        pid_file=$state_dir/broker.pid
    else
        broker_dir=$state_dir/broker-$node_index
        pid_file=$state_dir/broker-$node_index.pid
    fi
    log_dir=$broker_dir/log
    mnesia_base=$broker_dir/mnesia
    startup_log=$log_dir/startup.log
    # RabbitMQ's own pid file; ours (broker.pid) is authoritative for stop.
    rmq_pid_file=$broker_dir/$node.pid

    export RABBITMQ_NODENAME=$node
    export RABBITMQ_USE_LONGNAME=false
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=$amqp_port
    export RABBITMQ_DIST_PORT=$dist_port
    export RABBITMQ_MNESIA_BASE=$mnesia_base
    export RABBITMQ_LOG_BASE=$log_dir
    export RABBITMQ_CONFIG_FILE=$broker_dir/rabbitmq.conf
    # Otherwise /etc/rabbitmq/conf.d/*.conf would be merged into our config.
    export RABBITMQ_CONFIG_FILES=$broker_dir/conf.d
    export RABBITMQ_ADVANCED_CONFIG_FILE=$broker_dir/advanced.config
    # An empty file of our own, so /etc/rabbitmq/rabbitmq-env.conf is not sourced.
    export RABBITMQ_CONF_ENV_FILE=$broker_dir/rabbitmq-env.conf
    export RABBITMQ_ENABLED_PLUGINS_FILE=$broker_dir/enabled_plugins
    export RABBITMQ_PID_FILE=$rmq_pid_file
}

ctl() {
    "$RMQ_BIN/rabbitmqctl" -n "$node" "$@"
}

diag() {
    "$RMQ_BIN/rabbitmq-diagnostics" -n "$node" "$@"
}

# ---------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------
read_pid() {
    local pid=""
    if [[ -f "$pid_file" ]]; then read -r pid <"$pid_file" || true; fi
    is_uint "${pid:-x}" && echo "$pid"
    return 0
}

pid_alive() {
    [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null
}

is_beam() {
    [[ "$(ps -o comm= -p "$1" 2>/dev/null)" == beam.smp ]]
}

# The launcher is a sh wrapper (rabbitmq-server) that runs erl in the
# background; the process that matters for signals and pid checks is beam.smp.
find_beam_pid() {
    local launcher=$1 pid
    if [[ -f "$rmq_pid_file" ]]; then
        read -r pid <"$rmq_pid_file" || true
        if is_uint "${pid:-x}" && is_beam "$pid"; then
            echo "$pid"
            return 0
        fi
    fi
    if is_beam "$launcher"; then
        echo "$launcher"
        return 0
    fi
    for pid in $(ps -o pid= --ppid "$launcher" 2>/dev/null); do
        if is_beam "$pid"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

# True if the recorded node process exists and the rabbit app answers.
node_running() {
    local pid
    pid=$(read_pid)
    pid_alive "$pid" || return 1
    diag -q check_running >/dev/null 2>&1
}

port_in_use() {
    # bash's /dev/tcp avoids depending on ss/netstat being installed.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

mask_url() {
    sed -E 's#(amqps?://[^:/]*:)[^@]*@#\1****@#g' <<<"$1"
}

show_logs() {
    local f
    for f in "$startup_log" "$log_dir/$node.log"; do
        if [[ -s "$f" ]]; then
            echo "---- last 20 lines of $f ----" >&2
            tail -n 20 "$f" >&2
            # The banner's last line has no newline; keep the next header separate.
            echo >&2
        fi
    done
}

stop_epmd() {
    # Only our private epmd (on our port) is addressed; failure just means it
    # was not running.
    epmd -port "$epmd_port" -kill >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------------------
# Files of the node
# ---------------------------------------------------------------------------
readonly ACCOUNTS=(admin services clients)

new_password() {
    local pw
    # tr on a bounded input avoids SIGPIPE failures under pipefail.
    pw=$(head -c 4096 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9')
    pw=${pw:0:24}
    ((${#pw} == 24)) || die "could not generate a password from /dev/urandom"
    echo "$pw"
}

# Writes the credentials file (one "account=password" line each), mode 600.
write_credentials() {
    (
        umask 077
        printf 'admin=%s\nservices=%s\nclients=%s\n' \
            "$admin_pass" "$services_pass" "$clients_pass" >"$cred_file.tmp"
    )
    mv -f "$cred_file.tmp" "$cred_file"
}

load_or_create_credentials() {
    if [[ ! -s "$cred_file" ]] || ! grep -q '^clients=' "$cred_file"; then
        # The DB already holds users whose passwords we no longer know:
        # start over rather than run with unusable credentials.
        local n
        for ((n = 1; n <= (nodes > recorded_nodes ? nodes : recorded_nodes); n++)); do
            select_node "$n"
            if [[ -d "$mnesia_base" ]] && [[ -n "$(ls -A "$mnesia_base" 2>/dev/null)" ]]; then
                echo "broker: no credentials for this node's accounts, wiping $mnesia_base"
                rm -rf "$mnesia_base"
            fi
        done
        select_node 1
        admin_pass=$(new_password)
        services_pass=$(new_password)
        clients_pass=$(new_password)
        write_credentials
    fi
    chmod 600 "$cred_file"
    admin_pass=$(sed -n 's/^admin=//p' "$cred_file")
    services_pass=$(sed -n 's/^services=//p' "$cred_file")
    clients_pass=$(sed -n 's/^clients=//p' "$cred_file")
    [[ -n "$admin_pass" && -n "$services_pass" && -n "$clients_pass" ]] ||
        die "malformed $cred_file (delete it to regenerate)"
}

# RabbitMQ's rabbit_password_hashing_sha256: base64(salt ++ sha256(salt ++
# password)) with a random 4-byte salt. The definitions hold hashes only.
password_hash() {
    local tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/mqrpc-hash.XXXXXX")
    head -c 4 /dev/urandom >"$tmp/salt"
    { cat "$tmp/salt"; printf '%s' "$1"; } | openssl dgst -sha256 -binary >"$tmp/hash"
    cat "$tmp/salt" "$tmp/hash" | base64 -w0
    rm -rf "$tmp"
}

# The accounts and what each may do, loaded by the broker at boot and by
# "rotate". Permissions are regular expressions on resource names:
#   services: configure and read service_* queues (declare, consume), write
#             to the default exchange (replies); declare and read the
#             mqrpc.control exchange and declare, bind (write) and consume
#             their control queues mqrpc.control.* (exclusive: an instance
#             reads only its own)
#   clients:  configure and read server-named queues amq.gen-* (their
#             exclusive reply queues), write to the default exchange
#             (requests) and to mqrpc.control (pings). They cannot consume,
#             declare or delete service_*, nor bind to or read mqrpc.control.
write_definitions() {
    local a h users="" sep="" pw_var tags
    for a in "${ACCOUNTS[@]}"; do
        pw_var=${a}_pass
        tags='[]'
        [[ $a == admin ]] && tags='["administrator"]'
        h=$(password_hash "${!pw_var}")
        users+="$sep{\"name\":\"$a\",\"password_hash\":\"$h\","
        users+="\"hashing_algorithm\":\"rabbit_password_hashing_sha256\",\"tags\":$tags}"
        sep=","
    done
    (
        umask 077
        cat >"$definitions_file.tmp" <<EOF
{
  "users": [$users],
  "vhosts": [{"name": "/"}],
  "permissions": [
    {"user": "admin", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
    {"user": "services", "vhost": "/", "configure": "^(service_|mqrpc\\\\.control\$|mqrpc\\\\.control\\\\.)", "write": "^(amq\\\\.default\$|mqrpc\\\\.control\\\\.)", "read": "^(service_|mqrpc\\\\.control\$|mqrpc\\\\.control\\\\.)"},
    {"user": "clients", "vhost": "/", "configure": "^amq\\\\.gen-", "write": "^(amq\\\\.default|mqrpc\\\\.control)\$", "read": "^amq\\\\.gen-"}
  ]
}
EOF
    )
    mv -f "$definitions_file.tmp" "$definitions_file"
}

# A private CA, a server certificate for "localhost" and one client
# certificate, made once per state directory. The server certificate names
# localhost only, so a client connecting to 127.0.0.1 fails the host name
# check (the tests rely on it to show that the check is on).
make_certificates() {
    [[ -s "$tls_dir/ca.pem" && -s "$tls_dir/server.pem" && -s "$tls_dir/client.pem" ]] && return 0
    command -v openssl >/dev/null || die "openssl not found (run scripts/deps.sh)"
    rm -rf "$tls_dir"
    mkdir -p "$tls_dir"
    chmod 700 "$tls_dir"
    local log=$state_dir/openssl.log
    (
        umask 077
        cd "$tls_dir"
        set -e
        ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
        openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 3650 \
            -subj "/CN=mqrpc private CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign"
        openssl req "${ec[@]}" -keyout server.key -out server.csr -subj "/CN=localhost"
        printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out server.pem -days 825 -extfile server.ext
        openssl req "${ec[@]}" -keyout client.key -out client.csr -subj "/CN=mqrpc client"
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out client.pem -days 825 -extfile client.ext
        rm -f ./*.csr ./*.ext ./*.srl
    ) >"$log" 2>&1 || {
        tail -n 5 "$log" >&2
        die "could not generate certificates in $tls_dir"
    }
    rm -f "$log"
}

# What every node shares: accounts, definitions, certificates, the cookie.
write_shared() {
    mkdir -p "$shared_dir" "$HOME"
    chmod 700 "$shared_dir" "$HOME"
    load_or_create_credentials
    write_definitions
    if ((tls)); then make_certificates; fi
    # Erlang writes a cookie at a node's first start when there is none;
    # nodes started together would each write their own.
    if ((nodes > 1)) && [[ ! -s "$HOME/.erlang.cookie" ]]; then
        local cookie
        # tr on a bounded input avoids SIGPIPE failures under pipefail.
        cookie=$(head -c 4096 /dev/urandom | LC_ALL=C tr -dc '[:upper:]')
        (
            umask 077
            printf '%s' "${cookie:0:20}" >"$HOME/.erlang.cookie"
        )
        chmod 400 "$HOME/.erlang.cookie"
    fi
}

# The selected node's own files.
write_config() {
    mkdir -p "$broker_dir" "$log_dir" "$mnesia_base" "$RABBITMQ_CONFIG_FILES"
    chmod 700 "$broker_dir"
    : >"$RABBITMQ_CONF_ENV_FILE"
    [[ -f "$RABBITMQ_ADVANCED_CONFIG_FILE" ]] || echo '[].' >"$RABBITMQ_ADVANCED_CONFIG_FILE"

    # Regenerated on every start so changes to ports/management take effect.
    # default_user only applies when the DB is created: it replaces guest.
    (
        umask 077
        {
            echo "# Generated by scripts/broker.sh; edits are overwritten on start."
            echo "listeners.tcp.1 = 127.0.0.1:$amqp_port"
            echo "default_user = admin"
            echo "default_pass = $admin_pass"
            echo "load_definitions = $definitions_file"
            echo "log.console = false"
            echo "log.file.level = info"
            # How long a consumer may hold a delivery unacknowledged before
            # the broker closes its channel: the longest a service's handler
            # may run (README, Long-running handlers). RabbitMQ's default,
            # set explicitly so that it is visible and can be changed.
            echo "consumer_timeout = $consumer_timeout"
            if ((nodes > 1)); then
                # Three nodes share 2 cores and the memory of one machine:
                # the quorum WAL (default 512 MiB, kept in memory until it
                # rolls over) and the watermark (default 40% of RAM, each)
                # are bounded per node.
                echo "raft.wal_max_size_bytes = 67108864"
                # Otherwise each node names the cluster after itself.
                echo "cluster_name = mqrpc$base_port"
                echo "vm_memory_high_watermark.absolute = 1GiB"
            fi
            if ((tls)); then
                echo "listeners.ssl.1 = 127.0.0.1:$tls_port"
                echo "ssl_options.cacertfile = $tls_dir/ca.pem"
                echo "ssl_options.certfile = $tls_dir/server.pem"
                echo "ssl_options.keyfile = $tls_dir/server.key"
                echo "ssl_options.verify = verify_peer"
                echo "ssl_options.fail_if_no_peer_cert = true"
                echo "ssl_options.versions.1 = tlsv1.3"
                echo "ssl_options.versions.2 = tlsv1.2"
            fi
            if ((management && node_index == 1)); then
                echo "management.tcp.ip = 127.0.0.1"
                echo "management.tcp.port = $mgmt_port"
            fi
            if ((prometheus)); then
                # Queue depth and consumers per queue beside the services'
                # own metrics (packaging/prometheus): loopback only, and
                # per object, since the default aggregates all queues.
                echo "prometheus.tcp.ip = 127.0.0.1"
                echo "prometheus.tcp.port = $prom_port"
                echo "prometheus.return_per_object_metrics = true"
            fi
        } >"$RABBITMQ_CONFIG_FILE"
    )
    local plugins=()
    if ((management && node_index == 1)); then
        plugins+=(rabbitmq_management)
    elif ((management)); then
        # The UI on node 1 shows the other nodes through their agents.
        plugins+=(rabbitmq_management_agent)
    fi
    ((prometheus)) && plugins+=(rabbitmq_prometheus)
    (
        IFS=,
        echo "[${plugins[*]}]." >"$RABBITMQ_ENABLED_PLUGINS_FILE"
    )
}

# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------
print_ready() {
    local pid=$1
    if ((nodes > 1)); then
        echo "broker cluster of $nodes nodes ready on $(mask_url "$(<"$clients_url_file")")"
        cluster_lines
    else
        echo "broker $node ready on $(mask_url "$(<"$clients_url_file")") (pid $pid)"
    fi
    echo "URLs (with passwords) written to $clients_url_file and $services_url_file"
    if ((management)) && [[ -f "$mgmt_url_file" ]]; then
        echo "management UI: $(<"$mgmt_url_file") (user admin, password in $cred_file)"
    fi
    if ((prometheus)) && [[ -f "$prom_url_file" ]]; then
        echo "RabbitMQ metrics: $(paste -sd" " "$prom_url_file")"
    fi
}

# One line per node of a cluster (status and start).
cluster_lines() {
    local n rc=0
    for ((n = 1; n <= nodes; n++)); do
        select_node "$n"
        if node_running; then
            echo "node $n: running $node pid $(read_pid) amqp 127.0.0.1:$amqp_port$( ((tls)) && echo " tls 127.0.0.1:$tls_port")"
        else
            echo "node $n: not running $node (amqp 127.0.0.1:$amqp_port)"
            rc=$EXIT_NOT_RUNNING
        fi
    done
    select_node 1
    return "$rc"
}

# Percent-encodes what would end a URL query value.
url_escape() {
    local s=$1
    s=${s//%/%25}
    s=${s// /%20}
    s=${s//&/%26}
    s=${s//#/%23}
    s=${s//+/%2B}
    echo "$s"
}

# One URL file per account, mode 600: programs find them by role. A
# cluster's lists every node, comma-separated.
write_url_file() {
    local file=$1 user=$2 pass=$3 url="" n port
    for ((n = 1; n <= nodes; n++)); do
        ((n == 1)) || url+=","
        if ((tls)); then
            port=$((base_tls_port + 2 * (n - 1)))
            url+="amqps://$user:$pass@localhost:$port/?cacertfile=$(url_escape "$tls_dir/ca.pem")"
            url+="&certfile=$(url_escape "$tls_dir/client.pem")&keyfile=$(url_escape "$tls_dir/client.key")"
        else
            port=$((base_port + 2 * (n - 1)))
            url+="amqp://$user:$pass@127.0.0.1:$port/"
        fi
    done
    (
        umask 077
        echo "$url" >"$file.tmp"
    )
    mv -f "$file.tmp" "$file"
}

write_urls() {
    write_url_file "$services_url_file" services "$services_pass"
    write_url_file "$clients_url_file" clients "$clients_pass"
    if ((management)); then
        echo "http://127.0.0.1:$mgmt_port/" >"$mgmt_url_file"
    else
        rm -f "$mgmt_url_file"
    fi
    if ((prometheus)); then
        local n
        for ((n = 1; n <= nodes; n++)); do
            echo "http://127.0.0.1:$((base_prom_port + 2 * (n - 1)))/metrics"
        done >"$prom_url_file"
    else
        rm -f "$prom_url_file"
    fi
}

# launch_node: starts the selected node's server in the background; sets
# launcher. Dies if the node cannot be started.
launch_node() {
    local pid
    pid=$(read_pid)
    if [[ -n "$pid" ]]; then
        if pid_alive "$pid" && is_beam "$pid"; then
            # Our node exists but is not answering: do not start a second one
            # on top of it.
            die "node process $pid exists but $node does not answer; run '${0##*/} stop' first"
        fi
        echo "broker: removing stale pid file $pid_file (pid $pid)"
    fi
    # The URL files stay until write_urls replaces them (atomically): see
    # cmd_stop.
    rm -f "$pid_file" "$rmq_pid_file"
    ((node_index == 1)) && rm -f "$mgmt_url_file" "$prom_url_file"

    local p ports=("$amqp_port" "$dist_port")
    ((tls)) && ports+=("$tls_port")
    ((management && node_index == 1)) && ports+=("$mgmt_port")
    ((prometheus)) && ports+=("$prom_port")
    for p in "${ports[@]}"; do
        port_in_use "$p" && die "port $p on 127.0.0.1 is already in use (another broker? set MQRPC_BROKER_PORT)"
    done

    write_config
    # A node without a database of its own has never been a member.
    fresh=0
    [[ -d "$mnesia_base/$node" ]] || fresh=1

    # setsid: own session so the node survives the calling shell/terminal;
    # nohup + </dev/null: no stdin and no SIGHUP in CI.
    setsid nohup "$RMQ_BIN/rabbitmq-server" </dev/null >"$startup_log" 2>&1 &
    launcher=$!
    # Record something killable at once, refined to beam.smp below.
    echo "$launcher" >"$pid_file"
}

# await_node LAUNCHER DEADLINE: waits until the selected node is up; on
# failure shows its logs, kills it and exits.
await_node() {
    local launcher=$1 deadline=$2 beam="" now
    while :; do
        now=$(date +%s)
        if ! pid_alive "$launcher" && { [[ -z "$beam" ]] || ! pid_alive "$beam"; }; then
            echo "broker: $node exited during startup" >&2
            show_logs
            rm -f "$pid_file"
            ((nodes > 1)) || stop_epmd
            exit 1
        fi
        if [[ -z "$beam" ]] && beam=$(find_beam_pid "$launcher"); then
            echo "$beam" >"$pid_file"
        fi
        if [[ -n "$beam" ]] && ctl -q await_startup --timeout "$((deadline - now > 1 ? deadline - now : 1))" >/dev/null 2>&1; then
            break
        fi
        if ((now >= deadline)); then
            echo "broker: $node not ready after ${start_timeout}s" >&2
            show_logs
            kill_recorded "${beam:-$launcher}"
            rm -f "$pid_file"
            ((nodes > 1)) || stop_epmd
            exit 1
        fi
        sleep 0.5
    done
}

# join_new: the selected node (2..N), started for the first time, joins
# node 1's cluster. Its own database (the accounts it loaded alone) is
# reset: the cluster's is the one that counts.
join_new() {
    local first
    first=$(node_name 1)
    echo "broker: $node joins $first"
    {
        ctl -q stop_app && ctl -q reset && ctl -q join_cluster "$first" && ctl -q start_app
    } >>"$startup_log" 2>&1 || {
        show_logs
        echo "broker: $node could not join $first" >&2
        return 1
    }
}

# A change of the node count makes the nodes' databases (which name their
# cluster) useless: they go, with their queues; the credentials stay.
change_node_count() {
    local n
    for ((n = 1; n <= (nodes > recorded_nodes ? nodes : recorded_nodes); n++)); do
        select_node "$n"
        if pid_alive "$(read_pid)"; then
            die "the broker in $state_dir runs with $recorded_nodes node(s); stop it before starting $nodes"
        fi
    done
    for ((n = 1; n <= (nodes > recorded_nodes ? nodes : recorded_nodes); n++)); do
        select_node "$n"
        if [[ -d "$mnesia_base" ]] && [[ -n "$(ls -A "$mnesia_base" 2>/dev/null)" ]]; then
            echo "broker: $recorded_nodes node(s) before, $nodes now: wiping $mnesia_base"
            rm -rf "$mnesia_base"
        fi
        ((n <= nodes)) || rm -rf "$broker_dir" "$pid_file"
    done
    select_node 1
}

# start_nodes N...: starts the given nodes (not running) together, waits
# for each, lets new ones join node 1 (together: each join costs several
# CLI calls of seconds each).
start_nodes() {
    local n deadline launchers=() joining=() joins=() failed=0
    write_shared
    for n in "$@"; do
        select_node "$n"
        launch_node
        launchers[n]=$launcher
        ((fresh && n > 1)) && joining+=("$n")
    done
    deadline=$(($(date +%s) + start_timeout))
    for n in "$@"; do
        select_node "$n"
        await_node "${launchers[n]}" "$deadline"
    done
    for n in "${joining[@]}"; do
        select_node "$n"
        join_new &
        joins+=($!)
    done
    for n in "${joins[@]}"; do
        wait "$n" || failed=1
    done
    select_node 1
    ((failed == 0)) || die "the cluster did not form; '${0##*/} stop' stops its nodes"
}

cmd_start() {
    local pid n down=() t0 elapsed
    if ((nodes != recorded_nodes)); then
        change_node_count
    fi
    for ((n = 1; n <= nodes; n++)); do
        select_node "$n"
        node_running || down+=("$n")
    done
    select_node 1
    if ((${#down[@]} == 0)); then
        pid=$(read_pid)
        load_or_create_credentials
        [[ -f "$clients_url_file" && -f "$services_url_file" ]] || write_urls
        if ((nodes > 1)); then
            echo "broker cluster of $nodes nodes already running"
        else
            echo "broker $node already running (pid $pid)"
        fi
        print_ready "$pid"
        return 0
    fi
    if ((nodes > 1)); then
        mkdir -p "$shared_dir"
        echo "$nodes" >"$nodes_file.tmp"
        mv -f "$nodes_file.tmp" "$nodes_file"
    else
        rm -f "$nodes_file"
    fi
    t0=$(date +%s.%N)
    start_nodes "${down[@]}"
    write_urls
    elapsed=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if ((nodes > 1)); then
        echo "broker cluster of $nodes nodes started in ${elapsed}s"
    else
        echo "broker $node started in ${elapsed}s"
    fi
    print_ready "$(read_pid)"
}

# TERM then KILL one PID we recorded; never matches by name.
kill_recorded() {
    local pid=$1 i
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# stop_node: stops the selected node (gracefully, else by signal).
stop_node() {
    local pid
    pid=$(read_pid)
    # The URL files stay: the passwords stay valid for the next start, and
    # a program started meanwhile must fail to connect to this broker (and
    # reconnect once it is back), not fall back to guest@localhost:5672.
    if ! pid_alive "$pid"; then
        rm -f "$pid_file"
        ((node_index == 1)) && rm -f "$mgmt_url_file" "$prom_url_file"
        echo "broker $node not running"
        return 0
    fi
    # rabbitmqctl stop with a pid file waits until that process has exited.
    if ! timeout 30 "$RMQ_BIN/rabbitmqctl" -n "$node" -q stop "$pid_file" >/dev/null 2>&1; then
        echo "broker: graceful stop of $node failed or timed out, signalling pid $pid" >&2
        kill_recorded "$pid"
    fi
    # The sh launcher exits on its own once beam is gone; give it a moment.
    local i
    for ((i = 0; i < 20; i++)); do
        pid_alive "$pid" || break
        sleep 0.25
    done
    pid_alive "$pid" && die "pid $pid still alive after stop"
    rm -f "$pid_file" "$rmq_pid_file"
    ((node_index == 1)) && rm -f "$mgmt_url_file" "$prom_url_file"
    echo "broker $node stopped"
}

# Node 1 last: it then holds the cluster's last word, and the next start
# (all nodes together) finds every node waiting for it, not the reverse.
# The others stop together (each stop is seconds of CLI and shutdown).
cmd_stop() {
    local n stops=() failed=0
    for ((n = nodes; n >= 2; n--)); do
        select_node "$n"
        stop_node &
        stops+=($!)
    done
    for n in "${stops[@]}"; do
        wait "$n" || failed=1
    done
    select_node 1
    stop_node
    stop_epmd
    ((failed == 0)) || die "some node did not stop"
}

cmd_status() {
    if ((nodes > 1)); then
        cluster_lines
        return
    fi
    if node_running; then
        local extra=""
        # The file, not the env, tells whether this node was started with management.
        [[ -s "$mgmt_url_file" ]] && extra=" management $(<"$mgmt_url_file")"
        echo "running $node pid $(read_pid) amqp 127.0.0.1:$amqp_port$extra"
        return 0
    fi
    echo "broker $node not running"
    return "$EXIT_NOT_RUNNING"
}

# True if some node of the broker answers.
any_node_running() {
    local n
    for ((n = 1; n <= nodes; n++)); do
        select_node "$n"
        if node_running; then
            select_node 1
            return 0
        fi
    done
    select_node 1
    return 1
}

cmd_url() {
    local file=$clients_url_file
    [[ "$1" == services ]] && file=$services_url_file
    if any_node_running && [[ -s "$file" ]]; then
        cat "$file"
        return 0
    fi
    echo "broker: $node not running" >&2
    return "$EXIT_NOT_RUNNING"
}

# New passwords for every account, applied to the running broker. Open
# connections stay up (RabbitMQ checks passwords at login only); programs
# pick the new URL files up when they next connect.
cmd_rotate() {
    any_node_running || {
        echo "broker: $node not running" >&2
        return "$EXIT_NOT_RUNNING"
    }
    local n
    for ((n = 1; n <= nodes; n++)); do
        select_node "$n"
        node_running && break
    done
    load_or_create_credentials
    admin_pass=$(new_password)
    services_pass=$(new_password)
    clients_pass=$(new_password)
    write_definitions
    ctl -q import_definitions "$definitions_file" >/dev/null ||
        die "the broker did not take the new passwords; the old ones stay valid"
    write_credentials
    write_urls
    echo "broker $node: new passwords for ${ACCOUNTS[*]}; URL files rewritten"
}

# The node's Erlang VM (beam.smp) PID: what tests stop with SIGSTOP to play
# a broker that hangs without closing its connections.
cmd_pid() {
    local pid
    pid=$(read_pid)
    pid_alive "$pid" || {
        echo "broker: $node not running" >&2
        return "$EXIT_NOT_RUNNING"
    }
    echo "$pid"
}

# kill N: a crash of node N (SIGKILL of its Erlang VM), for fault tests.
cmd_kill() {
    local pid i
    pid=$(read_pid)
    if ! pid_alive "$pid" || ! is_beam "$pid"; then
        echo "broker: node $node_index ($node) not running" >&2
        return "$EXIT_NOT_RUNNING"
    fi
    kill -KILL "$pid"
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pid" || break
        sleep 0.05
    done
    pid_alive "$pid" && die "pid $pid still alive after SIGKILL"
    rm -f "$pid_file"
    echo "broker: node $node_index ($node, pid $pid) killed"
}

# start-node N: starts node N again (after kill N); it rejoins the cluster.
cmd_start_node() {
    local t0 elapsed
    if node_running; then
        echo "broker: node $node_index ($node) already running (pid $(read_pid))"
        return 0
    fi
    t0=$(date +%s.%N)
    start_nodes "$node_index"
    select_node "$1"
    elapsed=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "broker: node $node_index ($node) started in ${elapsed}s (pid $(read_pid))"
}

# MQRPC_BROKER_NODE: the node ctl and pid address.
select_asked_node() {
    local n=${MQRPC_BROKER_NODE:-1}
    if [[ ! "$n" =~ ^[1-9]$ ]] || ((n > nodes)); then
        die "MQRPC_BROKER_NODE must be a node of the broker (1 to $nodes), got '$n'"
    fi
    select_node "$n"
}

main() {
    if [[ "${1:-}" == ctl ]]; then
        # rabbitmqctl against this node (tests: list_connections,
        # close_connection), with the environment that finds it.
        shift
        setup_env
        select_asked_node
        ctl "$@"
        return
    fi
    if [[ "${1:-}" == kill || "${1:-}" == start-node ]]; then
        if (($# != 2)) || [[ ! "$2" =~ ^[1-9]$ ]]; then
            usage >&2
            exit 2
        fi
        [[ -x "$RMQ_BIN/rabbitmq-server" ]] || die "$RMQ_BIN/rabbitmq-server not found (run scripts/deps.sh)"
        setup_env
        (($2 <= nodes)) || die "no node $2: the broker has $nodes node(s)"
        select_node "$2"
        if [[ $1 == kill ]]; then cmd_kill; else cmd_start_node "$2"; fi
        return
    fi
    if (($# < 1 || $# > 2)) || { (($# == 2)) && [[ "$1" != url || ! "$2" =~ ^(clients|services)$ ]]; }; then
        usage >&2
        exit 2
    fi
    case "$1" in
    -h | --help | help)
        help_text
        exit 0
        ;;
    start | stop | status | url | restart | rotate | pid) ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
    [[ -x "$RMQ_BIN/rabbitmq-server" ]] || die "$RMQ_BIN/rabbitmq-server not found (run scripts/deps.sh)"
    setup_env
    case "$1" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) cmd_url "${2:-clients}" ;;
    rotate) cmd_rotate ;;
    pid)
        select_asked_node
        cmd_pid
        ;;
    restart)
        cmd_stop
        cmd_start
        ;;
    esac
}

main "$@"
