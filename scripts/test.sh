#!/usr/bin/env bash
# The test command: install missing packages, build with sanitizers in build/,
# run every CTest test, then the broker tests once more over TLS (the test
# broker then also listens with TLS and its URL files are amqps://),
# then the unit tests of a clang Release tree (build-clang/: the other
# compiler, optimised, no sanitizers; its unit.install checks installed
# binaries for build paths), then a short fuzz pass (scripts/fuzz.sh,
# $MQRPC_CI_FUZZ_SECONDS s per harness, default 15). Extra arguments go to
# ctest, e.g. `scripts/test.sh -L unit`; with arguments there is no TLS pass
# unless MQRPC_TEST_TLS=1, and no clang or fuzz pass.
#
# Unit tests need no broker. Broker tests start a private RabbitMQ node of
# their own through a CTest fixture (port 5692, state in build/test-var) and
# stop it at the end; the demo broker (5682) and the system rabbitmq-server
# are left alone. Exits with ctest's status.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
build=$repo/build

"$repo/scripts/deps.sh"

cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Debug -DMQRPC_SANITIZE=ON -DMQRPC_WERROR=ON \
    -DMQRPC_STATE_DIR="$repo/var"
cmake --build "$build" -j"$(nproc)"

cd "$build"
status=0
ctest --output-on-failure -j2 "$@" </dev/null || status=$?
if [[ $# == 0 || ${MQRPC_TEST_TLS:-0} == 1 ]]; then
    echo "== the broker tests again, over TLS =="
    MQRPC_BROKER_TLS=1 ctest --output-on-failure -j2 -L broker "$@" </dev/null || status=$?
fi
if [[ $# == 0 ]]; then
    echo "== clang Release build (build-clang/), unit tests =="
    # Built as a distribution would (default state directory, no source
    # path compiled in): unit.install checks its installed binaries for one.
    if cmake -S "$repo" -B "$repo/build-clang" -DCMAKE_C_COMPILER=clang \
        -DCMAKE_BUILD_TYPE=Release -DMQRPC_WERROR=ON \
        >/dev/null && cmake --build "$repo/build-clang" -j"$(nproc)"; then
        (cd "$repo/build-clang" && ctest --output-on-failure -j2 -L unit </dev/null) ||
            status=1
    else
        status=1
    fi
    # A short fuzz pass (the long one is `make fuzz`): a change that breaks
    # a parser on inputs the corpus does not hold shows up here.
    echo "== fuzzing, ${MQRPC_CI_FUZZ_SECONDS:-15} s per harness =="
    "$repo/scripts/fuzz.sh" "${MQRPC_CI_FUZZ_SECONDS:-15}" </dev/null || status=$?
fi
exit "$status"
