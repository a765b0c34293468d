#!/usr/bin/env python3
"""Runs the jfs benchmark workload on several directories and prints a table.

Workload per target (one worker, as in the issue):
  * sequential write of SIZE MiB in 1 MiB writes, then fsync and close;
  * sequential read of the same file in 1 MiB reads after dropping the page
    cache (echo 3 > /proc/sys/vm/drop_caches; needs root);
  * create, stat and unlink of FILES empty files in one directory.
Ratios are printed against the first target named `local` (and `bindfs`).
Called by scripts/bench.sh; usable alone:
  python3 scripts/bench.py --target local=/var/tmp/x --target jfs=/mnt/jfs
"""
import argparse
import os
import sys
import time

MIB = 1 << 20


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        print(f"warning: cannot drop caches ({e}); read figures include the page cache", file=sys.stderr)
        return False


def seq_write(path, size_mib):
    buf = os.urandom(MIB)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size_mib):
            view = memoryview(buf)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return size_mib / (time.perf_counter() - t0)


def seq_read(path, size_mib):
    buf = bytearray(MIB)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
    elapsed = time.perf_counter() - t0
    if total != size_mib * MIB:
        raise RuntimeError(f"read {total} bytes back from {path}, expected {size_mib * MIB}")
    return total / MIB / elapsed


def meta_ops(d, files):
    names = [os.path.join(d, f"f{i:06d}") for i in range(files)]
    t0 = time.perf_counter()
    for n in names:
        os.close(os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    t1 = time.perf_counter()
    for n in names:
        os.stat(n)
    t2 = time.perf_counter()
    for n in names:
        os.unlink(n)
    t3 = time.perf_counter()
    return files / (t1 - t0), files / (t2 - t1), files / (t3 - t2)


def run_target(name, base, size_mib, files):
    work = os.path.join(base, f".jfs-bench-{os.getpid()}")
    os.makedirs(work)
    try:
        data = os.path.join(work, "seq")
        print(f"[{name}] sequential write of {size_mib} MiB to {base} ...", file=sys.stderr, flush=True)
        w = seq_write(data, size_mib)
        dropped = drop_caches()
        print(f"[{name}] sequential read ...", file=sys.stderr, flush=True)
        r = seq_read(data, size_mib)
        os.unlink(data)
        meta = os.path.join(work, "meta")
        os.mkdir(meta)
        print(f"[{name}] create/stat/unlink of {files} files ...", file=sys.stderr, flush=True)
        c, s, u = meta_ops(meta, files)
        os.rmdir(meta)
    finally:
        # Leave nothing behind even after an error.
        for root, dirs, fs in os.walk(work, topdown=False):
            for f in fs:
                os.unlink(os.path.join(root, f))
            for d in dirs:
                os.rmdir(os.path.join(root, d))
        os.rmdir(work)
    return {"write": w, "read": r, "create": c, "stat": s, "unlink": u, "dropped": dropped}


COLUMNS = [("write", "write MiB/s"), ("read", "read MiB/s"), ("create", "create/s"), ("stat", "stat/s"),
           ("unlink", "unlink/s")]
MOOSEFS = {"write": 460, "read": 460, "create": 3500, "stat": 7400, "unlink": 3200}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", required=True, metavar="NAME=DIR",
                    help="a directory to measure; repeat (the first named 'local' is the baseline)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10000)
    args = ap.parse_args()

    targets = []
    for t in args.target:
        name, sep, d = t.partition("=")
        if not sep or not os.path.isdir(d):
            ap.error(f"--target {t!r}: expected NAME=DIR with an existing directory")
        targets.append((name, d))

    results = {}
    for name, d in targets:
        results[name] = run_target(name, d, args.size_mib, args.files)

    rows = [[name] + [f"{results[name][k]:,.0f}" for k, _ in COLUMNS] for name, _ in targets]
    for base in ("local", "bindfs"):
        if base in results and "jfs" in results:
            rows.append([f"jfs/{base}"] + [f"{results['jfs'][k] / results[base][k]:.2f}" for k, _ in COLUMNS])
    if "jfs" in results:
        rows.append(["jfs/MooseFS"] + [f"{results['jfs'][k] / MOOSEFS[k]:.2f}" for k, _ in COLUMNS])
    rows.append(["MooseFS ref"] + [f"{MOOSEFS[k]:,}" for k, _ in COLUMNS])
    header = ["target"] + [h for _, h in COLUMNS]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"# {args.size_mib} MiB sequential, {args.files} files, one worker; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} CPUs; kernel {os.uname().release}")
    if not all(r["dropped"] for r in results.values()):
        print("# WARNING: page cache not dropped before reads")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")


if __name__ == "__main__":
    main()
