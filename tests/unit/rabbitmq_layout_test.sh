#!/bin/sh
# rabbitmq_layout_test.sh CC SOURCE_DIR: the files that include rabbitmq-c
# compile with -Werror against rabbitmq-c 0.12+'s header layout, whose old
# names (<amqp.h>, ...) give a #warning. Without 0.12+ installed (Debian
# bookworm has 0.11), rabbitmq_c_shim/ simulates it over the old headers.
# First a control: <amqp.h> alone must fail, or the check proves nothing.
set -eu
cc=$1 src=$2
dir=$(mktemp -d "${TMPDIR:-/tmp}/mqrpc-layout.XXXXXX")
trap 'rm -rf "$dir"' EXIT

deps=$(pkg-config --cflags jansson openssl librabbitmq)
flags="-std=c11 -fsyntax-only -Wall -Wextra -Werror -D_POSIX_C_SOURCE=200809L"
shim=
echo '#include <rabbitmq-c/amqp.h>' >"$dir/new.c"
# shellcheck disable=SC2086 # $deps and $flags are word lists
if $cc $flags $deps "$dir/new.c" 2>/dev/null; then
    echo "rabbitmq-c has the new layout: testing against it"
else
    shim="-I$src/tests/unit/rabbitmq_c_shim"
    echo "rabbitmq-c has the old layout only: testing against $src/tests/unit/rabbitmq_c_shim"
fi

echo '#include <amqp.h>' >"$dir/old.c"
# shellcheck disable=SC2086
if $cc $flags $shim $deps "$dir/old.c" 2>"$dir/old.err"; then
    echo "FAIL: <amqp.h> compiled without its deprecation warning" >&2
    exit 1
fi

status=0
for f in src/amqp_conn.c bench/bare_pingpong.c; do
    # shellcheck disable=SC2086
    if $cc $flags $shim -I"$src/include" -I"$src/src" $deps "$src/$f"; then
        echo "ok: $f"
    else
        echo "FAIL: $f does not compile warning-free with the new layout" >&2
        status=1
    fi
done
exit $status
