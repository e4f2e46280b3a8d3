#!/usr/bin/python3
"""Prints the cost tables of scripts/bench.sh (issue 14).

Usage: report_costs.py COSTS.jsonl RESULTS.jsonl
COSTS.jsonl holds the callgrind totals ("insns ...") and the guarantee runs
("price CFG c=N #round"); RESULTS.jsonl the main table's runs, from which
the goals of issue 14 are computed. Every ratio is between figures of the
same run.
"""
import json
import re
import statistics
import sys


def load(path):
    rounds = {}
    try:
        f = open(path)
    except FileNotFoundError:
        return {}
    with f:
        for line in f:
            line = line.strip()
            if line:
                d = json.loads(line)
                if "label" not in d:
                    continue  # bench_threads.sh's rows
                rounds.setdefault(re.sub(r" #\d+$", "", d["label"]),
                                  []).append(d)
    runs = {}
    for label, ds in rounds.items():
        d = dict(ds[0])
        d["rounds"] = len(ds)
        for key in ("calls_per_s", "p50_us"):
            if key in d:
                d[key] = statistics.median(x[key] for x in ds)
        runs[label] = d
    return runs


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, spec="%.2fx"):
    return spec % x if x is not None else "n/a"


def main():
    costs = load(sys.argv[1])
    main_runs = load(sys.argv[2])

    print()
    print("Instructions per call (callgrind, user space, 1 call in flight; "
          "(I(n2) - I(n1)) / (n2 - n1)):")
    print()
    print("| side | ours | floor (bare rabbitmq-c) | ours / floor | goal | |")
    print("|---|---:|---:|---:|---:|---|")
    for side in ("client", "service"):
        per = {}
        for who in ("ours", "bare"):
            d = costs.get("insns %s %s" % (who, side))
            if d:
                per[who] = (d["i2"] - d["i1"]) / (d["n2"] - d["n1"])
        r = ratio(per.get("ours"), per.get("bare"))
        print("| %s | %s | %s | %s | <= 1.30x | %s |" % (
            side, fmt(per.get("ours"), "%.0f"), fmt(per.get("bare"), "%.0f"),
            fmt(r), "" if r is None else ("met" if r <= 1.3 else "MISSED")))

    def per_call(label):
        d = costs.get(label)
        return (d["i2"] - d["i1"]) / (d["n2"] - d["n1"]) if d else None

    base = per_call("insns knobs on")
    if base:
        print()
        print("The client's instructions per call with each guarantee off "
              "(rpc_bench_knobs, callgrind as above):")
        print()
        print("| rpc_bench_knobs | instructions per call | saved vs as shipped |")
        print("|---|---:|---:|")
        for cfg in ("on", "no-confirms", "no-mandatory", "no-expiration",
                    "none"):
            v = per_call("insns knobs %s" % cfg)
            if v is None:
                continue
            print("| %s | %.0f | %s |" % (
                "(as shipped)" if cfg == "on" else
                "--no-confirms --no-mandatory --no-expiration"
                if cfg == "none" else "--" + cfg, v,
                "" if cfg == "on" else "%.0f" % (base - v)))

    print()
    print("The price of each guarantee (rpc_bench_knobs against service_soma "
          "at prefetch 64; medians over the rounds):")
    print()
    print("| guarantee | in flight | calls/s on | calls/s off | on / off "
          "| p50 µs on | p50 µs off | on / off |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [("publisher confirms", "on", "no-confirms"),
            ("mandatory flag", "on", "no-mandatory"),
            ("expiration + deadline header", "on", "no-expiration"),
            ("all three (as shipped vs none)", "on", "none"),
            ("persistent requests, durable queues", "durable", "on"),
            ("TLS (client and service)", "tls", "on")]
    for name, on, off in rows:
        for c in (1, 64):
            a = costs.get("price %s c=%d" % (on, c))
            b = costs.get("price %s c=%d" % (off, c))
            if not a or not b:
                print("| %s | %d | not measured | | | | | |" % (name, c))
                continue
            print("| %s | %d | %.0f | %.0f | %.2fx | %.0f | %.0f | %.2fx |" % (
                name, c, a["calls_per_s"], b["calls_per_s"],
                ratio(a["calls_per_s"], b["calls_per_s"]), a["p50_us"],
                b["p50_us"], ratio(a["p50_us"], b["p50_us"])))
    print("| quorum queues | | not yet | | | | | |")

    def get(label, key):
        return main_runs.get(label, {}).get(key)

    print()
    print("| goal (issue 14, ours with confirms vs the floor) | measured "
          "| goal | |")
    print("|---|---:|---:|---|")
    goals = [
        ("pipelined (64 in flight, prefetch 64): calls/s",
         ratio(get("mqrpc c=64 p=64", "calls_per_s"),
               get("bare c=64 p=64", "calls_per_s")), 1.0, True),
        ("1 in flight: calls/s",
         ratio(get("mqrpc c=1 p=1", "calls_per_s"),
               get("bare c=1 p=1", "calls_per_s")), 0.95, True),
        ("1 in flight: p50",
         ratio(get("mqrpc c=1 p=1", "p50_us"), get("bare c=1 p=1", "p50_us")),
         1.1, False),
        ("one CPU, 1 in flight: calls/s",
         ratio(get("mqrpc c=1 p=1 one-cpu", "calls_per_s"),
               get("bare c=1 p=1 one-cpu", "calls_per_s")), 0.9, True),
    ]
    for name, r, goal, at_least in goals:
        if r is None:
            print("| %s | n/a | | |" % name)
            continue
        met = r >= goal if at_least else r <= goal
        print("| %s | %.2fx | %s %.2fx | %s |" % (
            name, r, ">=" if at_least else "<=", goal,
            "met" if met else "MISSED"))


if __name__ == "__main__":
    main()
