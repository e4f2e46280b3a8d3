#!/usr/bin/env bash
# install_test.sh BUILD_DIR SOURCE_DIR CC CXX [CFLAGS]: what a user of an
# installed mqrpc gets. Installs BUILD_DIR into a temporary prefix, then:
#  - no installed file holds the source or the build directory's path
#    (with sanitizers, whose runtime data names source files, only the
#    text files are checked);
#  - the installed service_busca finds its data (<prefix>/share/mqrpc);
#  - tests/install/consumer.c builds and runs through find_package(mqrpc)
#    (shared and static targets), through pkg-config (shared) and through
#    pkg-config --static (libmqrpc.a);
#  - the public header compiles as C++11, pedantic, warning-free.
# CFLAGS (the tree's sanitizer flags, if any) are used for the consumers.
set -euo pipefail

build=$(cd "$1" && pwd -P) src=$(cd "$2" && pwd -P) cc=$3 cxx=$4 cflags=${5:-}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mqrpc-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
step() { echo "== $*"; }

step "cmake --install into $prefix"
cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" ||
    { cat "$tmp/install.log"; fail "cmake --install"; }

step "no source or build path in the installed files"
grep_opts=(-r -l -F)
if [[ -n $cflags ]]; then
    echo "(sanitizer build: text files only)"
    grep_opts+=(-I)
fi
for dir in "$src" "$build"; do
    if grep "${grep_opts[@]}" -e "$dir" "$prefix"; then
        fail "the files above contain $dir"
    fi
done

pc=$(find "$prefix" -name mqrpc.pc)
[[ -n $pc ]] || fail "no mqrpc.pc installed"
libdir=$(dirname "$(dirname "$pc")")
export PKG_CONFIG_PATH=${pc%/*} AMQP_URL=

step "the installed service_busca loads its data"
# It opens the database, from the shipped data, before connecting to the
# broker, which then fails at once (nothing listens on port 1, and
# --connect-timeout 0 does not wait for one).
AMQP_URL=amqp://127.0.0.1:1/ "$prefix/bin/service_busca" --connect-timeout 0 --db "$tmp/busca.db" \
    >"$tmp/busca.log" 2>&1 || true
if grep -q 'data file' "$tmp/busca.log" || [[ ! -s $tmp/busca.db ]]; then
    cat "$tmp/busca.log"
    fail "service_busca did not load $prefix/share/mqrpc/pessoas.json"
fi

# run NAME: runs a consumer, which must print the timeout's name and text.
run() {
    local out
    out=$("$1") || fail "$1 exited with $?"
    [[ $out == "timeout: timed out" ]] || fail "$1 printed: $out"
    echo "ok: $1"
}

step "find_package(mqrpc CONFIG)"
cmake -S "$src/tests/install" -B "$tmp/cmake" -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_C_COMPILER="$cc" -DCMAKE_C_FLAGS="$cflags" >"$tmp/cmake.log" 2>&1 &&
    cmake --build "$tmp/cmake" >>"$tmp/cmake.log" 2>&1 ||
    { cat "$tmp/cmake.log"; fail "building the CMake consumer"; }
readelf -d "$tmp/cmake/consumer" | grep -q 'NEEDED.*libmqrpc\.so\.1' ||
    fail "consumer does not link libmqrpc.so.1"
if readelf -d "$tmp/cmake/consumer_static" | grep -q 'NEEDED.*libmqrpc'; then
    fail "consumer_static links libmqrpc dynamically"
fi
run "$tmp/cmake/consumer"
run "$tmp/cmake/consumer_static"

step "pkg-config"
# shellcheck disable=SC2046,SC2086 # pkg-config prints word lists
"$cc" $cflags -o "$tmp/consumer_pc" "$src/tests/install/consumer.c" \
    $(pkg-config --cflags --libs mqrpc) || fail "cc ... \$(pkg-config --cflags --libs mqrpc)"
LD_LIBRARY_PATH=$libdir run "$tmp/consumer_pc"

step "pkg-config --static, libmqrpc.a"
libs=$(pkg-config --static --libs mqrpc)
# libmqrpc.so sits next to libmqrpc.a, and the linker prefers it
libs=${libs/-lmqrpc/-Wl,-Bstatic -lmqrpc -Wl,-Bdynamic}
# shellcheck disable=SC2046,SC2086
"$cc" $cflags -o "$tmp/consumer_pc_static" "$src/tests/install/consumer.c" \
    $(pkg-config --cflags mqrpc) $libs || fail "static link with pkg-config --static"
if readelf -d "$tmp/consumer_pc_static" | grep -q 'NEEDED.*libmqrpc'; then
    fail "consumer_pc_static links libmqrpc dynamically"
fi
run "$tmp/consumer_pc_static"

step "the header as C++11"
# shellcheck disable=SC2046
echo '#include <mqrpc/mqrpc.h>' |
    "$cxx" -std=c++11 -Wall -Wextra -Werror -pedantic -fsyntax-only -x c++ - \
        $(pkg-config --cflags mqrpc) || fail "mqrpc.h does not compile as C++11"
echo "ok: mqrpc.h as C++11"
