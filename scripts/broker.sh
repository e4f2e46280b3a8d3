#!/usr/bin/env bash
# Run a private RabbitMQ node for mqrpc (demo and tests), isolated from the
# system rabbitmq-server service: own node name, own ports, own epmd, own
# state directory. Only /usr/lib/rabbitmq/bin/* is used because those scripts
# run as the caller and honour RABBITMQ_* variables (the /usr/sbin wrappers
# switch user and would touch the system installation).
#
# Usage: scripts/broker.sh start|stop|status|restart|rotate|pid|url [clients|services]|--help
#        scripts/broker.sh ctl RABBITMQCTL-ARGS...
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
#                                metrics; URL in <state>/prometheus_url;
#                                default AMQP+10010: 15692 for 5682)
#   MQRPC_BROKER_PROMETHEUS      1 = enable that endpoint (default), 0 = off
#   MQRPC_BROKER_START_TIMEOUT   seconds to wait for readiness (default 60)
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
#
# Exit codes: 0 ok, 1 error, 2 usage error,
#             3 not running (status/url; LSB convention for "program is not running").
set -euo pipefail

readonly RMQ_BIN=/usr/lib/rabbitmq/bin
readonly EXIT_NOT_RUNNING=3

usage() {
    echo "usage: ${0##*/} start|stop|status|restart|rotate|pid|url [clients|services]|--help"
    echo "       ${0##*/} ctl RABBITMQCTL-ARGS..."
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

    amqp_port=${MQRPC_BROKER_PORT:-5682}
    is_uint "$amqp_port" || die "MQRPC_BROKER_PORT must be a number, got '$amqp_port'"
    # Derived ports keep parallel brokers (demo, tests) from colliding as long
    # as their AMQP ports differ.
    mgmt_port=${MQRPC_MGMT_PORT:-$((amqp_port + 10000))}
    dist_port=${MQRPC_DIST_PORT:-$((amqp_port + 20000))}
    epmd_port=${MQRPC_EPMD_PORT:-$((amqp_port - 1000))}
    prom_port=${MQRPC_PROMETHEUS_PORT:-$((amqp_port + 10010))}
    local p
    for p in "$mgmt_port" "$dist_port" "$epmd_port" "$prom_port"; do
        is_uint "$p" || die "port settings must be numbers, got '$p'"
    done
    for p in "$amqp_port" "$mgmt_port" "$dist_port" "$epmd_port" "$prom_port"; do
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
    tls_port=${MQRPC_BROKER_TLS_PORT:-$((amqp_port + 1))}
    is_uint "$tls_port" && ((tls_port >= 1 && tls_port <= 65535)) ||
        die "MQRPC_BROKER_TLS_PORT must be a port number, got '$tls_port'"
    consumer_timeout=${MQRPC_BROKER_CONSUMER_TIMEOUT_MS:-1800000}
    is_uint "$consumer_timeout" && ((consumer_timeout >= 1)) ||
        die "MQRPC_BROKER_CONSUMER_TIMEOUT_MS must be a number of milliseconds, got '$consumer_timeout'"
    start_timeout=${MQRPC_BROKER_START_TIMEOUT:-60}
    is_uint "$start_timeout" || die "MQRPC_BROKER_START_TIMEOUT must be a number of seconds"

    node="mqrpc${amqp_port}@localhost"
    broker_dir=$state_dir/broker
    pid_file=$state_dir/broker.pid
    clients_url_file=$state_dir/clients.url
    services_url_file=$state_dir/services.url
    mgmt_url_file=$state_dir/management_url
    prom_url_file=$state_dir/prometheus_url
    cred_file=$broker_dir/credentials
    definitions_file=$broker_dir/definitions.json
    tls_dir=$state_dir/tls
    log_dir=$broker_dir/log
    mnesia_base=$broker_dir/mnesia
    startup_log=$log_dir/startup.log
    # RabbitMQ's own pid file; ours (broker.pid) is authoritative for stop.
    rmq_pid_file=$broker_dir/$node.pid

    # Drop any RABBITMQ_* inherited from the caller (e.g. RABBITMQ_LOGS,
    # RABBITMQ_MNESIA_DIR) so they cannot redirect our node into shared paths.
    local v
    for v in $(compgen -e); do
        if [[ "$v" == RABBITMQ_* ]]; then unset "$v"; fi
    done

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
    # The Erlang cookie lives in $HOME; a private HOME avoids sharing (or
    # clobbering) the user's ~/.erlang.cookie.
    export HOME=$broker_dir/home
    # A private epmd: the system one (4369) belongs to the system service.
    export ERL_EPMD_PORT=$epmd_port
    export ERL_EPMD_ADDRESS=127.0.0.1
    # Without this the distribution listener binds to 0.0.0.0.
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    # The CLI tools also open a distribution listener (ports 35672-35682).
    export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
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
    sed -E 's#(amqps?://[^:/]*:)[^@]*@#\1****@#' <<<"$1"
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
        if [[ -d "$mnesia_base" ]] && [[ -n "$(ls -A "$mnesia_base" 2>/dev/null)" ]]; then
            echo "broker: no credentials for this node's accounts, wiping $mnesia_base"
            rm -rf "$mnesia_base"
        fi
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

write_config() {
    mkdir -p "$broker_dir" "$HOME" "$log_dir" "$mnesia_base" "$RABBITMQ_CONFIG_FILES"
    chmod 700 "$broker_dir" "$HOME"
    : >"$RABBITMQ_CONF_ENV_FILE"
    [[ -f "$RABBITMQ_ADVANCED_CONFIG_FILE" ]] || echo '[].' >"$RABBITMQ_ADVANCED_CONFIG_FILE"

    load_or_create_credentials
    write_definitions
    if ((tls)); then make_certificates; fi

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
            if ((management)); then
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
    ((management)) && plugins+=(rabbitmq_management)
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
    echo "broker $node ready on $(mask_url "$(<"$clients_url_file")") (pid $pid)"
    echo "URLs (with passwords) written to $clients_url_file and $services_url_file"
    if ((management)) && [[ -f "$mgmt_url_file" ]]; then
        echo "management UI: $(<"$mgmt_url_file") (user admin, password in $cred_file)"
    fi
    if ((prometheus)) && [[ -f "$prom_url_file" ]]; then
        echo "RabbitMQ metrics: $(<"$prom_url_file")"
    fi
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

# One URL file per account, mode 600: programs find them by role.
write_url_file() {
    local file=$1 user=$2 pass=$3 url
    if ((tls)); then
        url="amqps://$user:$pass@localhost:$tls_port/?cacertfile=$(url_escape "$tls_dir/ca.pem")"
        url+="&certfile=$(url_escape "$tls_dir/client.pem")&keyfile=$(url_escape "$tls_dir/client.key")"
    else
        url="amqp://$user:$pass@127.0.0.1:$amqp_port/"
    fi
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
        echo "http://127.0.0.1:$prom_port/metrics" >"$prom_url_file"
    else
        rm -f "$prom_url_file"
    fi
}

cmd_start() {
    local pid
    pid=$(read_pid)
    if pid_alive "$pid" && diag -q check_running >/dev/null 2>&1; then
        load_or_create_credentials
        [[ -f "$clients_url_file" && -f "$services_url_file" ]] || write_urls
        echo "broker $node already running (pid $pid)"
        print_ready "$pid"
        return 0
    fi
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
    rm -f "$pid_file" "$mgmt_url_file" "$prom_url_file" "$rmq_pid_file"

    local p ports=("$amqp_port" "$dist_port")
    ((tls)) && ports+=("$tls_port")
    ((management)) && ports+=("$mgmt_port")
    ((prometheus)) && ports+=("$prom_port")
    for p in "${ports[@]}"; do
        port_in_use "$p" && die "port $p on 127.0.0.1 is already in use (another broker? set MQRPC_BROKER_PORT)"
    done

    write_config

    local t0 launcher beam="" deadline now
    t0=$(date +%s.%N)
    # setsid: own session so the node survives the calling shell/terminal;
    # nohup + </dev/null: no stdin and no SIGHUP in CI.
    setsid nohup "$RMQ_BIN/rabbitmq-server" </dev/null >"$startup_log" 2>&1 &
    launcher=$!
    # Record something killable at once, refined to beam.smp below.
    echo "$launcher" >"$pid_file"

    deadline=$(($(date +%s) + start_timeout))
    while :; do
        now=$(date +%s)
        if ! pid_alive "$launcher" && { [[ -z "$beam" ]] || ! pid_alive "$beam"; }; then
            echo "broker: $node exited during startup" >&2
            show_logs
            rm -f "$pid_file"
            stop_epmd
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
            stop_epmd
            exit 1
        fi
        sleep 0.5
    done

    write_urls
    local elapsed
    elapsed=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "broker $node started in ${elapsed}s"
    print_ready "$beam"
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

cmd_stop() {
    local pid
    pid=$(read_pid)
    # The URL files stay: the passwords stay valid for the next start, and
    # a program started meanwhile must fail to connect to this broker (and
    # reconnect once it is back), not fall back to guest@localhost:5672.
    if ! pid_alive "$pid"; then
        rm -f "$pid_file" "$mgmt_url_file" "$prom_url_file"
        stop_epmd
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
    stop_epmd
    rm -f "$pid_file" "$mgmt_url_file" "$prom_url_file" "$rmq_pid_file"
    echo "broker $node stopped"
}

cmd_status() {
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

cmd_url() {
    local file=$clients_url_file
    [[ "$1" == services ]] && file=$services_url_file
    if node_running && [[ -s "$file" ]]; then
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
    node_running || {
        echo "broker: $node not running" >&2
        return "$EXIT_NOT_RUNNING"
    }
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

main() {
    if [[ "${1:-}" == ctl ]]; then
        # rabbitmqctl against this node (tests: list_connections,
        # close_connection), with the environment that finds it.
        shift
        setup_env
        ctl "$@"
        return
    fi
    if (($# < 1 || $# > 2)) || { (($# == 2)) && [[ "$1" != url || ! "$2" =~ ^(clients|services)$ ]]; }; then
        usage >&2
        exit 2
    fi
    case "$1" in
    -h | --help | help)
        usage
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
    pid) cmd_pid ;;
    restart)
        cmd_stop
        cmd_start
        ;;
    esac
}

main "$@"
