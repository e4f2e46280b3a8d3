#!/usr/bin/env bash
# Fuzzing, bounded: builds the libFuzzer harnesses (fuzz/fuzz_*.c) with clang
# in build-fuzz/ and runs each one for a fixed time.
#
#   scripts/fuzz.sh [SECONDS_PER_HARNESS]   (default $MQRPC_FUZZ_SECONDS, else 60)
#
# Each harness starts from a scratch corpus, build-fuzz/corpus/<harness>/:
# the committed seeds (fuzz/corpus/) and saved crashes (fuzz/regressions/)
# are copied there, and what libFuzzer finds is added there too, so later
# runs resume from it while the committed files are never written. Crashes,
# leaks, timeouts (10 s) and out-of-memory (2048 MB) are saved in
# build-fuzz/artifacts/<harness>/. Prints executions and coverage per
# harness; exits 1 if any harness failed, naming each failing input and the
# command that reproduces it. Fix the bug, then copy the input into
# fuzz/regressions/<harness>/ so that every test run replays it
# (fuzz/README.md). Needs no terminal: fine for CI.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
secs=${1:-${MQRPC_FUZZ_SECONDS:-60}}
out=$repo/build-fuzz

die() {
    echo "fuzz: $*" >&2
    exit 2
}

[[ $secs =~ ^[1-9][0-9]*$ ]] || die "seconds per harness must be a positive integer, got \"$secs\""

harnesses=()
for src in "$repo"/fuzz/fuzz_*.c; do
    name=${src##*/fuzz_}
    harnesses+=("${name%.c}")
done
((${#harnesses[@]})) || die "no harness in $repo/fuzz"

"$repo/scripts/deps.sh" --fuzz

# clang-14 matches libclang-rt-14-dev's libFuzzer (scripts/deps.sh --fuzz).
mkdir -p "$out/logs"
if ! cmake -S "$repo" -B "$out" -DCMAKE_C_COMPILER=clang-14 \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMQRPC_FUZZ=ON -DMQRPC_TESTS=OFF -DMQRPC_WERROR=ON \
    >"$out/logs/configure.log" 2>&1; then
    cat "$out/logs/configure.log" >&2
    die "configuring $out failed"
fi
cmake --build "$out" -j"$(nproc)" --target fuzzers

# UBSan aborts (the tree is built with -fno-sanitize-recover), and says where.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

# run_harness NAME: one bounded run; returns libFuzzer's status.
run_harness() {
    local name=$1 corpus=$out/corpus/$1 artifacts=$out/artifacts/$1
    local dir

    mkdir -p "$corpus"
    rm -rf "$artifacts"
    mkdir -p "$artifacts"
    for dir in "$repo/fuzz/corpus/$name" "$repo/fuzz/regressions/$name"; do
        if [[ -d $dir ]]; then
            find "$dir" -maxdepth 1 -type f ! -name '.*' -exec cp -- {} "$corpus/" \;
        fi
    done
    "$out/bin/fuzz_$name" -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048 -detect_leaks=1 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "$corpus" \
        </dev/null >"$out/logs/$name.log" 2>&1
}

# last_field LOG KEY: the value after "KEY: " on the last line that has it.
last_field() {
    grep -o "$2: [0-9]*" "$1" | tail -n 1 | cut -d' ' -f2
}

failed=()
summary=$(printf '%-20s %12s %8s %6s %7s %7s  %s' harness executions exec/s cov ft corpus result)
for name in "${harnesses[@]}"; do
    echo "== fuzz_$name: $secs s" >&2
    status=ok
    run_harness "$name" || status=FAILED
    log=$out/logs/$name.log
    execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | cut -d' ' -f2 || true)
    summary+=$'\n'$(printf '%-20s %12s %8s %6s %7s %7s  %s' "fuzz_$name" \
        "${execs:-?}" "$(last_field "$log" exec/s)" "$(last_field "$log" cov)" \
        "$(last_field "$log" ft)" "$(find "$out/corpus/$name" -type f | wc -l)" \
        "$status")
    [[ $status == ok ]] && continue
    failed+=("$name")
    echo "fuzz_$name FAILED; the end of its log ($log):" >&2
    tail -n 40 "$log" >&2
    found=0
    for input in "$out/artifacts/$name"/*; do
        [[ -f $input ]] || continue
        found=1
        echo "fuzz_$name: failing input: $input" >&2
        echo "  reproduce: $out/bin/fuzz_$name $input" >&2
    done
    ((found)) || echo "fuzz_$name: no input saved; see $log" >&2
done

echo
echo "$summary"
if ((${#failed[@]})); then
    echo "fuzz: FAILED: ${failed[*]} (inputs and commands above)" >&2
    exit 1
fi
echo "fuzz: all ${#harnesses[@]} harnesses ran $secs s each without a failure"
