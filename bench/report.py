#!/usr/bin/python3
"""Turns scripts/bench.sh's JSON lines into one table and the targets.

Usage: report.py RESULTS.jsonl --service-rss KIB --leaks TEXT --command CMD
Every figure is from the same run; the targets are ratios between them
(issue 3), because the machine's absolute speed varies between runs.
"""
import argparse
import json
import re
import statistics
import sys


def go_peer_ratios(ratio):
    """The Go peer (bench/go, amqp091-go) against the floor and ours."""
    for what, run in (("1 in flight", "c=1 p=1"),
                      ("64 in flight, prefetch 1", "c=64 p=1"),
                      ("64 in flight, prefetch 64", "c=64 p=64"),
                      ("one CPU, 1 in flight", "c=1 p=1 one-cpu")):
        ratio("Go peer vs bare, %s: calls/s (info)" % what, "go " + run,
              "bare " + run, "calls_per_s", 0)
    ratio("Go peer vs bare, 1 in flight: p50 (info)", "go c=1 p=1",
          "bare c=1 p=1", "p50_us", 0)
    ratio("mqrpc vs Go peer, 1 in flight: calls/s (info)", "mqrpc c=1 p=1",
          "go c=1 p=1", "calls_per_s", 0)
    ratio("mqrpc vs Go peer, 64 in flight, prefetch 64: calls/s (info)",
          "mqrpc c=64 p=64", "go c=64 p=64", "calls_per_s", 0)
    ratio("many clients (100x1, 2 instances): Go peer vs bare calls/s (info)",
          "many clients go 100x1 2 inst",
          "many clients bare 100x1 2 inst", "calls_per_s", 0)
    ratio("many clients (100x1, 2 instances): Go peer vs bare p99 (info)",
          "many clients go 100x1 2 inst",
          "many clients bare 100x1 2 inst", "p99_us", 0)
    ratio("many clients (100x1, 2 instances): mqrpc vs Go peer calls/s (info)",
          "many clients mqrpc 100x1 2 inst",
          "many clients go 100x1 2 inst", "calls_per_s", 0)


def print_sweep(runs):
    """The open-loop sweep: one row per implementation and offered rate."""
    rows = [d for d in runs.values() if "sweep" in d]
    if not rows:
        return
    print()
    print("Open loop, latency from each call's scheduled start:")
    print()
    print("| impl | offered/s | achieved/s | p50 µs | p90 µs | p99 µs "
          "| p99.9 µs | max µs | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d in sorted(rows, key=lambda d: (d["sweep"], d["rate"])):
        print("| %s | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %d |"
              % (d["sweep"], d["offered_per_s"], d["achieved_per_s"],
                 d["p50_us"], d["p90_us"], d["p99_us"], d["p999_us"],
                 d["max_us"], d["errors"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--service-rss", type=int, default=0)
    ap.add_argument("--leaks", default="not checked")
    ap.add_argument("--command", default="scripts/bench.sh")
    a = ap.parse_args()

    # "label #k" are rounds of one measurement: keep the median of each
    # figure (implementations took turns, so a noisy second hits all).
    rounds = {}
    with open(a.results) as f:
        for line in f:
            line = line.strip()
            if line:
                d = json.loads(line)
                # bench_threads.sh's rows ("kind": "threads") have a
                # table of their own
                if "label" not in d:
                    continue
                label = re.sub(r" #\d+$", "", d["label"])
                rounds.setdefault(label, []).append(d)
    runs = {}
    for label, ds in rounds.items():
        d = dict(ds[0])
        d["rounds"] = len(ds)
        for key in ("calls_per_s", "p50_us", "p99_us"):
            d[key] = statistics.median(x[key] for x in ds)
        d["errors"] = sum(x.get("errors", 0) for x in ds)
        d["calls"] = sum(x["calls"] for x in ds)
        cpus = [x.get("cpu_us_per_call", {}) for x in ds]
        d["cpu_us_per_call"] = {
            k: statistics.mean(c.get(k, 0) for c in cpus)
            for k in ("broker", "service", "client")}
        runs[label] = d

    def get(label, key):
        return runs.get(label, {}).get(key)

    print()
    print("Command: %s" % a.command)
    print()
    print("| run | rounds | calls/s | p50 µs | p99 µs | errors "
          "| CPU µs/call: broker | service | client |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, d in runs.items():
        if label == "mqrpc memory" or "sweep" in d:
            continue
        cpu = d.get("cpu_us_per_call", {})
        print("| %s | %d | %.0f | %.0f | %.0f | %s | %.0f | %.0f | %.0f |" % (
            label, d["rounds"], d["calls_per_s"], d.get("p50_us", 0),
            d.get("p99_us", 0), d.get("errors", "-"),
            cpu.get("broker", 0), cpu.get("service", 0),
            cpu.get("client", 0)))

    print_sweep(runs)

    checks = []

    def ratio(name, num, den, key, goal, higher_is_better=True):
        x, y = get(num, key), get(den, key)
        if not x or not y:
            checks.append((name, "missing", goal, False))
            return
        r = x / y
        ok = r >= goal if higher_is_better else r <= goal
        checks.append((name, "%.2fx" % r,
                       (">= %.2fx" if higher_is_better else "<= %.2fx") % goal,
                       ok))

    ratio("1 in flight, prefetch 1: calls/s vs bare", "mqrpc c=1 p=1",
          "bare c=1 p=1", "calls_per_s", 0.9)
    ratio("1 in flight, prefetch 1: p50 vs bare", "mqrpc c=1 p=1",
          "bare c=1 p=1", "p50_us", 1.15, higher_is_better=False)
    ratio("64 in flight, prefetch 1: calls/s vs bare", "mqrpc c=64 p=1",
          "bare c=64 p=1", "calls_per_s", 0.9)
    ratio("64 in flight, prefetch 64: calls/s vs bare", "mqrpc c=64 p=64",
          "bare c=64 p=64", "calls_per_s", 1.0)
    ratio("vs seed, 1 in flight: calls/s", "mqrpc c=1 p=1", "seed c=1 p=1",
          "calls_per_s", 3.0)
    ratio("vs seed, pipelined (64 in flight): calls/s", "mqrpc c=64 p=64",
          "seed c=64 p=1", "calls_per_s", 10.0)
    ratio("slow handler (5 ms): 8 instances vs 1", "work5ms x8",
          "work5ms x1", "calls_per_s", 7.0)
    ratio("one CPU, 1 in flight: calls/s vs bare (info)",
          "mqrpc c=1 p=1 one-cpu", "bare c=1 p=1 one-cpu", "calls_per_s", 0)
    ratio("one CPU, 1 in flight: p50 vs bare (info)",
          "mqrpc c=1 p=1 one-cpu", "bare c=1 p=1 one-cpu", "p50_us", 0)
    ratio("one CPU, 1 in flight: calls/s vs seed (info)",
          "mqrpc c=1 p=1 one-cpu", "seed c=1 p=1 one-cpu", "calls_per_s", 0)
    ratio("one CPU, 1 in flight: bare vs seed (info)",
          "bare c=1 p=1 one-cpu", "seed c=1 p=1 one-cpu", "calls_per_s", 0)
    ratio("1 in flight: bare vs seed (info)", "bare c=1 p=1",
          "seed c=1 p=1", "calls_per_s", 0)
    ratio("direct reply-to vs reply queue, 1 in flight (info)",
          "mqrpc c=1 p=1 direct", "mqrpc c=1 p=1", "calls_per_s", 0.0)
    ratio("direct reply-to vs reply queue, 64 in flight (info)",
          "mqrpc c=64 p=1 direct", "mqrpc c=64 p=1", "calls_per_s", 0.0)
    ratio("many clients (100x1, 2 instances): calls/s vs bare (info)",
          "many clients mqrpc 100x1 2 inst",
          "many clients bare 100x1 2 inst", "calls_per_s", 0)
    ratio("many clients (100x1, 2 instances): p99 vs bare (info)",
          "many clients mqrpc 100x1 2 inst",
          "many clients bare 100x1 2 inst", "p99_us", 0)
    go_peer_ratios(ratio)

    rss = a.service_rss
    checks.append(("service peak RSS under load (prefetch 64)",
                   "%.1f MiB" % (rss / 1024), "< 8 MiB",
                   0 < rss < 8 * 1024))
    mem = runs.get("mqrpc memory")
    if mem:
        growth = mem["rss_kib_end"] - mem["rss_kib_warm"]
        checks.append(("client RSS over %d calls" % mem["calls"],
                       "%d -> %d KiB" % (mem["rss_kib_warm"],
                                         mem["rss_kib_end"]),
                       "flat (< 256 KiB growth)",
                       growth < 256 and mem["errors"] == 0))
    else:
        checks.append(("client RSS over many calls", "missing", "flat",
                       False))
    checks.append(("leaks under valgrind", a.leaks, "none",
                   a.leaks.startswith("none")))

    print()
    print("| target | measured | goal | |")
    print("|---|---:|---:|---|")
    failed = 0
    for name, got, goal, ok in checks:
        info = "(info)" in name
        mark = "" if info else ("met" if ok else "MISSED")
        failed += 0 if (ok or info) else 1
        print("| %s | %s | %s | %s |" % (name, got, goal if not info else "",
                                         mark))
    print()
    errors = sum(d.get("errors", 0) for d in runs.values())
    print("%d targets missed; %d calls failed in all runs" % (failed, errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
