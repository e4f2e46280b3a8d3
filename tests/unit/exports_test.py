#!/usr/bin/env python3
"""exports_test.py LIBRARY HEADER: the shared library's dynamic symbol
table defines exactly the names HEADER declares with MQRPC_API, nothing
else (no mqr_* internals, no symbol of a static dependency). The names are
read from the header, so the test follows it as it grows."""
import re
import subprocess
import sys


def declared(header):
    text = open(header, encoding="utf-8").read()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)  # comments
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", " ", text, flags=re.M)  # directives
    names = set()
    # A declaration runs from MQRPC_API to its ';': a function's name is the
    # identifier before its first '(', an object's the last one before ';',
    # '[' or '='.
    for decl in re.findall(r"\bMQRPC_API\b([^;]*);", text):
        m = re.search(r"([A-Za-z_]\w*)\s*\(", decl) or \
            re.search(r"([A-Za-z_]\w*)\s*(?:\[[^;]*|=[^;]*)?$", decl.strip())
        if not m:
            sys.exit(f"cannot find the name in: MQRPC_API{decl};")
        names.add(m.group(1))
    return names


def exported(library):
    out = subprocess.run(["nm", "-D", "--defined-only", library], check=True,
                         capture_output=True, text=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines()
            if line.strip()}


def main():
    library, header = sys.argv[1:3]
    want, got = declared(header), exported(library)
    if len(want) < 10 or "mqrpc_strerror" not in want:
        sys.exit(f"only {len(want)} MQRPC_API names found in {header}: parser broken?")
    missing, extra = sorted(want - got), sorted(got - want)
    for name in missing:
        print(f"declared MQRPC_API but not exported: {name}")
    for name in extra:
        print(f"exported but not declared MQRPC_API: {name}")
    print(f"{len(got)} symbols exported, {len(want)} declared")
    return 1 if missing or extra else 0


if __name__ == "__main__":
    sys.exit(main())
