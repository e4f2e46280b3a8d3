#!/usr/bin/python3
"""Turns the open-loop sweep rows of scripts/bench.sh into plot data.

Usage: load_data.py RESULTS.jsonl OUTDIR
Writes OUTDIR/load-NAME.dat for each implementation NAME of the sweep
(rows carrying "sweep": NAME), one line per rate: offered/s, achieved/s,
p50, p90, p99, p99.9 and max latency in ms, errors. Prints the words
bench/plot_load.gp takes as `impls`: NAME "TITLE" for each.
"""
import json
import sys

TITLES = {"mqrpc": "mqrpc (ours)", "bare": "bare rabbitmq-c (floor)",
          "go": "Go amqp091-go"}


def main():
    results, outdir = sys.argv[1:3]
    rows = {}
    with open(results) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                if "sweep" in d:
                    rows.setdefault(d["sweep"], []).append(d)
    # A fixed order, so that each implementation keeps its colour in the
    # plot whatever order the sweep ran them in.
    order = list(TITLES) + sorted(set(rows) - set(TITLES))
    words = []
    for name in (n for n in order if n in rows):
        ds = rows[name]
        with open("%s/load-%s.dat" % (outdir, name), "w") as f:
            f.write("# offered/s achieved/s p50_ms p90_ms p99_ms p999_ms "
                    "max_ms errors\n")
            for d in sorted(ds, key=lambda d: d["rate"]):
                f.write("%.0f %.0f %.3f %.3f %.3f %.3f %.3f %d\n" % (
                    d["offered_per_s"], d["achieved_per_s"],
                    d["p50_us"] / 1e3, d["p90_us"] / 1e3, d["p99_us"] / 1e3,
                    d["p999_us"] / 1e3, d["max_us"] / 1e3, d["errors"]))
        words.append('%s "%s"' % (name, TITLES.get(name, name)))
    print(" ".join(words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
