#!/usr/bin/env bash
# Install the Debian packages needed to build and test mqrpc.
# Usage: deps.sh [--bench] [--fuzz]
#   --bench adds what scripts/bench.sh uses (Go for its Go peer included),
#   --fuzz what scripts/fuzz.sh uses
#   (clang 14 and its libFuzzer, which Debian ships in libclang-rt-14-dev).
#
# Idempotent and quiet: a machine that already has everything is left alone
# (no apt-get update, no network), so this is cheap to run from CI or from
# other scripts before every build.
#
# About rabbitmq-server: we only need its files (/usr/lib/rabbitmq/bin/*).
# On a systemd machine installing the package starts the system service; we
# deliberately leave that service alone (never stop/start/reconfigure it),
# because scripts/broker.sh runs its own node that shares nothing with it:
# a different node name (mqrpc<port>@localhost instead of rabbit@<host>),
# different ports (5682/15682/25682 by default instead of 5672/15672/25672)
# and a private epmd on another port (4682 instead of 4369).
set -euo pipefail

packages=(
    gcc g++ clang libc6-dev make cmake pkg-config
    librabbitmq-dev libjansson-dev libsqlite3-dev libcmocka-dev
    libmicrohttpd-dev prometheus
    libssl-dev openssl
    libsystemd-dev
    rabbitmq-server
    python3 python3-pika
    procps
)
for arg in "$@"; do
    case "$arg" in
    --bench) packages+=(gnuplot-nox valgrind) ;;
    --fuzz) packages+=(clang-14 libclang-rt-14-dev) ;;
    esac
done
# The Go peer (bench/go): Go and the RabbitMQ client's sources, which build
# offline in GOPATH mode. Only the benchmark needs them.
for arg in "$@"; do
    if [[ "$arg" == --bench ]]; then
        packages+=(golang-go golang-github-rabbitmq-amqp091-go-dev)
    fi
done

missing=()
for pkg in "${packages[@]}"; do
    # dpkg-query is the only reliable check: "deinstall"/"config-files" states
    # leave a record without files, so mere presence in the database is not enough.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "deps: nothing to do, all ${#packages[@]} packages installed"
    exit 0
fi

# Root runs apt directly; otherwise only non-interactive sudo is acceptable
# because CI has no terminal to type a password into.
as_root=()
if ((EUID != 0)); then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        echo "deps: missing packages (need root or passwordless sudo): ${missing[*]}" >&2
        exit 1
    fi
fi

log=$(mktemp "${TMPDIR:-/tmp}/mqrpc-deps.XXXXXX")
trap 'rm -f "$log"' EXIT

# Output is captured and only shown on failure, to keep CI logs short.
if ! "${as_root[@]}" apt-get update -q >"$log" 2>&1 ||
    ! "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" \
        </dev/null >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "deps: apt-get failed installing: ${missing[*]}" >&2
    exit 1
fi

echo "deps: installed ${missing[*]}"
