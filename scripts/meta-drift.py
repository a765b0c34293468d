#!/usr/bin/env python3
"""Does metadata slow down, or metad's disk use grow, as history piles up?

Runs ROUNDS rounds of `jfs bench meta` (each: create FILES files, look
each up, unlink each, with CLIENTS concurrent clients over RPC) against the
cluster of STATE/jfs.toml, and after each round prints the rates and
the size of every metad data directory. The first and the last rounds
should agree within noise, and the directories should level off (the Raft
log is purged after each snapshot, RocksDB compacts its tombstones).

  python3 scripts/meta-drift.py [--rounds 20] [--files 10000] [--clients 16]
                                [--state /var/lib/jfs/local] [--jfs jfs]
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass  # RocksDB deleted it meanwhile
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--state", default="/var/lib/jfs/local", help="local cluster state dir (metad*/ are measured)")
    ap.add_argument("--jfs", default="jfs", help="the jfs command")
    args = ap.parse_args()
    dirs = sorted(glob.glob(os.path.join(args.state, "metad*")))
    conf = os.path.join(args.state, "jfs.toml")
    if not dirs:
        sys.exit(f"meta-drift.py: no metad* directories in {args.state}")
    print(f"# {args.rounds} rounds of {args.files:,} creates + lookups + unlinks, {args.clients} clients over RPC")
    print("| round | create/s | stat/s | unlink/s | " + " | ".join(f"{os.path.basename(d)} MiB" for d in dirs) + " |")
    print("|---:|---:|---:|---:|" + "---:|" * len(dirs))
    rates = []
    t0 = time.monotonic()
    for r in range(1, args.rounds + 1):
        p = subprocess.run([args.jfs, "bench", "meta", "--conf", conf, "--clients", str(args.clients),
                            "--files", str(args.files), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            sys.exit(f"meta-drift.py: round {r}: jfs bench meta exited {p.returncode}: {p.stderr.strip()}")
        run = json.loads(p.stdout)["runs"][0]
        row = [run[op]["ops_per_sec"] for op in ("create", "stat", "unlink")]
        rates.append(row)
        sizes = [du(d) / (1 << 20) for d in dirs]
        print(f"| {r} | " + " | ".join(f"{v:,.0f}" for v in row) + " | "
              + " | ".join(f"{s:,.1f}" for s in sizes) + " |", flush=True)
    n = max(1, min(3, len(rates) // 3))
    first = [statistics.median(x[i] for x in rates[:n]) for i in range(3)]
    last = [statistics.median(x[i] for x in rates[-n:]) for i in range(3)]
    print(f"\nmedian of the first {n} vs the last {n} rounds: "
          + ", ".join(f"{op} {a:,.0f} -> {b:,.0f} ({b / a:.2f}x)" for op, a, b in zip(("create", "stat", "unlink"), first, last))
          + f"; {(time.monotonic() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
