#!/usr/bin/env python3
"""Runs the jfs benchmark lines on several directories, interleaved, and
prints one markdown table: median and min-max per target, and jfs/MooseFS and
jfs/local ratios. Called by scripts/bench.sh (which mounts the targets);
usable alone, as root (it drops the page cache), with fio installed:

  python3 scripts/bench.py --target local=/var/tmp/x --target moosefs=/mnt/mfs \\
      --target jfs=/mnt/jfs [--reps 3] [--quick]

Each repetition runs every line on every target in turn (rep 1: target 1,
target 2, ...; rep 2: ...), so a slow phase of the machine hits all targets
alike. Every line starts with `sync; echo 3 > /proc/sys/vm/drop_caches`, so
read lines start cold and no line pays for the previous one's dirty pages.
fio lines use --ioengine=psync (plain pread/pwrite from one thread per job,
as an ordinary program does) and --fallocate=none, and are parsed from
--output-format=json. The lines, in the order they run on each target:

  seq write    1 GiB in 1 MiB writes to a new file, then fsync (end_fsync=1,
               counted in the time): MiB/s. This file is the layout for the
               lines below.
  seq read     that file in 1 MiB reads, cold: MiB/s.
  rand write   4 KiB pwrites at random offsets of the file for RUNTIME s:
    buffered     through the page cache, no fsync at the end (end_fsync=0):
                 how fast writes are absorbed, IOPS;
    O_DIRECT     --direct=1: each write reaches the filesystem, IOPS.
  rand read    4 KiB preads at random offsets for RUNTIME s, cold cache:
    buffered 1 job, buffered 4 jobs (4 threads of one fio on the same
    file, summed), O_DIRECT 1 job: IOPS.
  cp -r in     copy a local tree of TREE_FILES 4 KiB files (100 per
               directory, the source tree in the page cache) into the
               target: seconds, lower is better.
  tar out      `tar -cf - tree` of that tree in the target, into a pipe
               that is counted and dropped, cold cache: seconds, lower is
               better.
  untar        `tar -xf` of an archive of UNTAR_FILES files of 1 KiB (100
               per directory, the archive in the page cache) into the
               target: seconds, lower is better.
  create/stat/unlink
               of FILES empty files in one directory (open O_CREAT|O_EXCL +
               close; stat; unlink), by 1 worker and by 4 worker processes
               (each a quarter of the names): ops/s. The kernel serialises
               creates and unlinks in one directory (the directory's inode
               lock), so the 4-worker lines in one directory measure the
               latency of one operation; the "own directories" lines give
               each worker a directory of its own.
  rpc          with --jfs-cli (jfs only): `jfs bench meta` with 1, 4 and 16
               clients over RPC, no FUSE (create/stat/unlink of FILES
               files), and the floor of one synchronous client (one round
               trip + one fsync), printed beside the one-worker lines.

--small runs only the small-file lines (cp, tar, untar, create/stat/unlink,
rpc).

A line that fails on a target (e.g. O_DIRECT refused) is reported as
"error" in its cell, and the run goes on.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
LABELS = {"local": "local (disk)", "bindfs": "bindfs", "moosefs": "MooseFS", "jfs": "jfs"}

# key, title, unit, higher_is_better
LINES = [
    ("seqwrite", "seq write {size}, 1 MiB writes + fsync", "MiB/s", True),
    ("seqread", "seq read {size}, cold cache", "MiB/s", True),
    ("randwrite_buf", "4 KiB rand write, buffered, 1 job", "IOPS", True),
    ("randwrite_direct", "4 KiB rand write, O_DIRECT, 1 job", "IOPS", True),
    ("randread_buf1", "4 KiB rand read, buffered, 1 job", "IOPS", True),
    ("randread_buf4", "4 KiB rand read, buffered, 4 jobs", "IOPS", True),
    ("randread_direct", "4 KiB rand read, O_DIRECT, 1 job", "IOPS", True),
    ("cp_in", "cp -r in, {tree} files of 4 KiB", "s", False),
    ("tar_out", "tar out, {tree} files of 4 KiB, cold cache", "s", False),
    ("untar", "untar {untar} files of 1 KiB", "s", False),
    ("create1", "create {files} empty files, 1 worker", "ops/s", True),
    ("stat1", "stat {files} files, 1 worker", "ops/s", True),
    ("unlink1", "unlink {files} files, 1 worker", "ops/s", True),
    ("create4", "create {files} empty files, 4 workers", "ops/s", True),
    ("stat4", "stat {files} files, 4 workers", "ops/s", True),
    ("unlink4", "unlink {files} files, 4 workers", "ops/s", True),
    ("create4d", "create {files} empty files, 4 workers, own directories", "ops/s", True),
    ("stat4d", "stat {files} files, 4 workers, own directories", "ops/s", True),
    ("unlink4d", "unlink {files} files, 4 workers, own directories", "ops/s", True),
]
# Lines only jfs has: metadata over RPC, by `jfs bench meta`.
RPC_LINES = [
    (f"rpc_{op}{n}", f"RPC {op}, {n} client{'s' if n > 1 else ''} (no FUSE)", "ops/s", True)
    for n in (1, 4, 16) for op in ("create", "stat", "unlink")
]
SMALL = {"cp_in", "tar_out", "untar", "create1", "stat1", "unlink1", "create4", "stat4", "unlink4",
         "create4d", "stat4d", "unlink4d"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class LineError(Exception):
    pass


def drop_caches():
    """sync, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        log(f"warning: cannot drop caches ({e}); read figures include the page cache")
        return False


def run(cmd, **kw):
    """subprocess.run, but an interruption (SIGTERM/Ctrl-C, see main) first
    asks the child to stop (SIGINT: fio ends its jobs and closes its files,
    so that the target can be unmounted) and kills it only if it does not."""
    p = subprocess.Popen(cmd, **kw)
    try:
        out, err = p.communicate()
    except BaseException:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


# ---------------------------------------------------------------- fio lines

def fio(name, filename, size_mib, tmpdir, extra):
    """Runs one fio job group, returns the aggregated job from its JSON."""
    out = os.path.join(tmpdir, f"fio-{name}.json")
    # fio splits --filename at ':' (a list of files) unless escaped.
    filename = filename.replace(":", "\\:")
    cmd = ["fio", f"--name={name}", f"--filename={filename}", f"--size={size_mib}m",
           "--ioengine=psync", "--fallocate=none", "--thread", "--group_reporting",
           "--output-format=json", f"--output={out}"] + extra
    p = run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with open(out) as f:
            text = f.read()
        # fio may print notes before the JSON document in its output file.
        data = json.loads(text[text.index("{"):])
        job = data["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        raise LineError(f"fio failed (exit {p.returncode}): {p.stderr.strip()[-300:]}")
    finally:
        if os.path.exists(out):
            os.unlink(out)
    if job.get("error"):
        raise LineError(f"fio error {job['error']}: {p.stderr.strip()[-300:]}")
    return job


def fio_seq(kind, path, size_mib, tmpdir):
    """Sequential write (new file, fsync at the end) or read: MiB/s."""
    rw = "write" if kind == "seqwrite" else "read"
    extra = [f"--rw={rw}", "--bs=1m"]
    if rw == "write":
        extra.append("--end_fsync=1")
    job = fio(kind, path, size_mib, tmpdir, extra)
    io_bytes = job[rw]["io_bytes"]
    if io_bytes < size_mib * MIB:
        raise LineError(f"fio moved {io_bytes} bytes, expected {size_mib * MIB}")
    return job[rw]["bw_bytes"] / MIB


def fio_rand(rw, path, size_mib, runtime, numjobs, direct, tmpdir):
    """4 KiB random reads or writes for RUNTIME seconds: IOPS (all jobs)."""
    extra = [f"--rw=rand{rw}", "--bs=4k", "--time_based", f"--runtime={runtime}",
             f"--numjobs={numjobs}", f"--direct={int(direct)}"]
    if rw == "write":
        extra.append("--end_fsync=0")
    job = fio(f"rand{rw}", path, size_mib, tmpdir, extra)
    if job[rw]["total_ios"] == 0:
        raise LineError("fio did no I/O")
    return job[rw]["iops"]


# ----------------------------------------------------- tree: cp -r and tar

def make_tree(root, nfiles):
    """A tree of nfiles files of 4 KiB, 100 per directory."""
    per_dir = 100
    for i in range(nfiles):
        d = os.path.join(root, f"d{i // per_dir:03d}")
        if i % per_dir == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
            f.write(os.urandom(4096))


def warm_tree(root):
    for dirpath, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                f.read()


def count_files(root):
    return sum(len(names) for _, _, names in os.walk(root))


def cp_in(src, dst, nfiles):
    warm_tree(src)
    t0 = time.perf_counter()
    if run(["cp", "-r", src, dst]).returncode != 0:
        raise LineError("cp -r failed")
    elapsed = time.perf_counter() - t0
    if count_files(dst) != nfiles:
        raise LineError(f"cp -r copied {count_files(dst)} files, expected {nfiles}")
    return elapsed


def tar_out(parent, name, nfiles):
    # The archive goes to a pipe that we count and drop, not to /dev/null:
    # GNU tar does not read the files' data when the archive is /dev/null.
    t0 = time.perf_counter()
    p = subprocess.Popen(["tar", "-C", parent, "-cf", "-", name], stdout=subprocess.PIPE)
    total = 0
    try:
        while True:
            chunk = p.stdout.read(MIB)
            if not chunk:
                break
            total += len(chunk)
    except BaseException:
        p.kill()
        p.wait()
        raise
    rc = p.wait()
    elapsed = time.perf_counter() - t0
    if rc != 0 or total < nfiles * 4096:
        raise LineError(f"tar exited {rc} after {total} bytes (expected more than {nfiles * 4096})")
    return elapsed


# ------------------------------------------------------ metadata lines

def _create(names):
    for n in names:
        os.close(os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def _stat(names):
    for n in names:
        os.stat(n)


def _unlink(names):
    for n in names:
        os.unlink(n)


def meta_ops(d, nfiles, workers, pool, own_dirs=False):
    """create, stat, unlink of nfiles names in d (or, own_dirs, in one
    subdirectory of d per worker): ops/s of each phase."""
    if own_dirs:
        for w in range(workers):
            os.mkdir(os.path.join(d, f"w{w}"))
        shares = [[os.path.join(d, f"w{w}", f"f{i:06d}") for i in range(w, nfiles, workers)]
                  for w in range(workers)]
    else:
        names = [os.path.join(d, f"f{i:06d}") for i in range(nfiles)]
        shares = [names[w::workers] for w in range(workers)]
    out = []
    for fn in (_create, _stat, _unlink):
        t0 = time.perf_counter()
        if workers == 1:
            fn(shares[0])
        else:
            pool.map(fn, shares)
        out.append(nfiles / (time.perf_counter() - t0))
    return out


def make_archive(path, nfiles):
    """A tar archive of nfiles files of 1 KiB, 100 per directory."""
    src = path + ".src"
    for i in range(nfiles):
        d = os.path.join(src, f"d{i // 100:03d}")
        if i % 100 == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
            f.write(os.urandom(1024))
    subprocess.run(["tar", "-C", src, "-cf", path, "."], check=True)
    shutil.rmtree(src)


def untar(archive, dst, nfiles):
    with open(archive, "rb") as f:  # the archive in the page cache, as cp's source
        while f.read(MIB):
            pass
    os.mkdir(dst)
    t0 = time.perf_counter()
    if run(["tar", "-C", dst, "-xf", archive]).returncode != 0:
        raise LineError("tar -x failed")
    elapsed = time.perf_counter() - t0
    if count_files(dst) != nfiles:
        raise LineError(f"tar -x made {count_files(dst)} files, expected {nfiles}")
    return elapsed


def rpc_meta(jfs_cli, nfiles):
    """`jfs bench meta` with 1, 4 and 16 clients: {line key: ops/s}, floor."""
    p = subprocess.run([jfs_cli, "bench", "meta", "--clients", "1,4,16", "--files", str(nfiles), "--json"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise LineError(f"jfs bench meta exited {p.returncode}: {p.stderr.strip()[-300:]}")
    rep = json.loads(p.stdout)
    out = {}
    for r in rep["runs"]:
        for op in ("create", "stat", "unlink"):
            out[f"rpc_{op}{r['clients']}"] = r[op]["ops_per_sec"]
    return out, rep["floor"]


# ------------------------------------------------------------- one pass

def run_target(name, base, args, src_tree, tmpdir, pool, results, rep):
    """Every line once on one target; results[key][name] gets the values."""
    work = os.path.join(base, f".jfs-bench-{os.getpid()}")
    os.makedirs(work)
    size = args.size_mib
    data = os.path.join(work, "data")

    def line(key, fn, *a):
        if args.only and key not in args.only:
            return None
        drop_caches()
        t0 = time.monotonic()
        try:
            v = fn(*a)
        except (LineError, OSError, subprocess.CalledProcessError) as e:
            log(f"  [{name} rep {rep}] {key}: ERROR {e}")
            v = None
        else:
            log(f"  [{name} rep {rep}] {key}: {v:,.2f} ({time.monotonic() - t0:.1f} s)")
        results[key][name].append(v)
        return v

    try:
        if not args.small:
            data_lines(name, args, line, data, size, tmpdir, rep)
        small_lines(name, args, line, work, src_tree, tmpdir, pool, results, rep)
        if name == "jfs" and args.jfs_cli:
            drop_caches()
            t0 = time.monotonic()
            try:
                vals, floor = rpc_meta(args.jfs_cli, args.files)
            except (LineError, OSError, ValueError, KeyError) as e:
                log(f"  [{name} rep {rep}] rpc: ERROR {e}")
                vals, floor = {}, None
            else:
                log(f"  [{name} rep {rep}] rpc: " + ", ".join(f"{k} {v:,.0f}" for k, v in vals.items())
                    + f" ops/s; floor {floor['floor_ms']:.3f} ms ({time.monotonic() - t0:.1f} s)")
                results["floor"].append(floor)
            for key, *_ in RPC_LINES:
                results[key][name].append(vals.get(key))
    finally:
        # Leave nothing behind, even after an error.
        shutil.rmtree(work, ignore_errors=True)


def data_lines(name, args, line, data, size, tmpdir, rep):
    if True:
        # Sequential write of a new file, fsync included: MiB/s. It also lays
        # out the file that every fio line below works on.
        line("seqwrite", fio_seq, "seqwrite", data, size, tmpdir)
        if not os.path.exists(data) or os.path.getsize(data) < size * MIB:
            # The random lines need the file; lay it out plainly.
            log(f"  [{name} rep {rep}] laying out {data} after a failed seq write")
            with open(data, "wb") as f:
                for _ in range(size):
                    f.write(os.urandom(MIB))
        # Sequential read, cold (line() drops the page cache first): MiB/s.
        line("seqread", fio_seq, "seqread", data, size, tmpdir)
        # 4 KiB random writes for RUNTIME s: through the page cache with no
        # fsync (how fast the filesystem absorbs them), then O_DIRECT (each
        # one goes to the filesystem before the next): IOPS.
        line("randwrite_buf", fio_rand, "write", data, size, args.runtime, 1, False, tmpdir)
        line("randwrite_direct", fio_rand, "write", data, size, args.runtime, 1, True, tmpdir)
        # 4 KiB random reads for RUNTIME s from a cold cache: buffered by one
        # and by four jobs (threads of one fio, summed), then O_DIRECT: IOPS.
        line("randread_buf1", fio_rand, "read", data, size, args.runtime, 1, False, tmpdir)
        line("randread_buf4", fio_rand, "read", data, size, args.runtime, 4, False, tmpdir)
        line("randread_direct", fio_rand, "read", data, size, args.runtime, 1, True, tmpdir)
        os.unlink(data)


def small_lines(name, args, line, work, src_tree, tmpdir, pool, results, rep):
    if True:
        # A tree of small files: `cp -r` of a cached local tree into the
        # target, then `tar` of it out of the target, cold: seconds.
        tree = os.path.join(work, "tree")
        line("cp_in", cp_in, src_tree, tree, args.tree_files)
        line("tar_out", tar_out, work, "tree", args.tree_files)
        shutil.rmtree(tree, ignore_errors=True)
        # Many small files written at once: untar of a cached archive.
        line("untar", untar, os.path.join(tmpdir, "untar.tar"), os.path.join(work, "untar"),
             args.untar_files)
        shutil.rmtree(os.path.join(work, "untar"), ignore_errors=True)

        # Metadata: create, stat, unlink of FILES empty files in one
        # directory, by 1 and by 4 processes, then by 4 in a directory
        # each: ops/s.
        for workers, own, suffix in ((1, False, "1"), (4, False, "4"), (4, True, "4d")):
            meta = os.path.join(work, f"meta{suffix}")
            os.mkdir(meta)
            keys = [f"create{suffix}", f"stat{suffix}", f"unlink{suffix}"]
            if args.only and not set(keys) & set(args.only):
                os.rmdir(meta)
                continue
            drop_caches()
            t0 = time.monotonic()
            try:
                vals = meta_ops(meta, args.files, workers, pool, own)
            except OSError as e:
                log(f"  [{name} rep {rep}] metadata, {workers} worker(s){' own dirs' if own else ''}: ERROR {e}")
                vals = [None] * 3
            else:
                log(f"  [{name} rep {rep}] create/stat/unlink, {workers} worker(s){' own dirs' if own else ''}: "
                    + " / ".join(f"{v:,.0f}" for v in vals) + f" ops/s ({time.monotonic() - t0:.1f} s)")
            for k, v in zip(keys, vals):
                if not args.only or k in args.only:
                    results[k][name].append(v)
            shutil.rmtree(meta, ignore_errors=True)


# ---------------------------------------------------------------- output

def fmt(v):
    if v is None:
        return "error"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def cell(values):
    if not values:  # a line this target does not run (the RPC lines)
        return "–", None
    ok = [v for v in values if v is not None]
    if not ok:
        return "error", None
    med = statistics.median(ok)
    s = fmt(med)
    if len(ok) > 1:
        s += f" ({fmt(min(ok))}–{fmt(max(ok))})"
    if len(ok) < len(values):
        s += f" [{len(values) - len(ok)} failed]"
    return s, med


def ratio_cell(subject, baseline, higher_is_better):
    """Speed of subject relative to baseline, on medians: > 1 = subject faster."""
    if subject is None or baseline is None or subject == 0 or baseline == 0:
        return "–"
    r = subject / baseline if higher_is_better else baseline / subject
    s = f"{r:.2f}"
    if not higher_is_better:
        s += f" ({r:.1f}× faster)" if r >= 1 else f" ({1 / r:.1f}× slower)"
    return s


def print_table(targets, results, ratios, args, lines):
    header = ["line", "unit"] + [LABELS.get(n, n) for n, _ in targets] + \
             [f"{LABELS.get(a, a)}/{LABELS.get(b, b)}" for a, b in ratios]
    rows = []
    for key, title, unit, hib in lines:
        t = title.format(size=f"{args.size_mib} MiB" if args.size_mib % 1024 else f"{args.size_mib // 1024} GiB",
                         tree=f"{args.tree_files:,}", files=f"{args.files:,}", untar=f"{args.untar_files:,}")
        meds = {}
        cells = []
        for n, _ in targets:
            s, meds[n] = cell(results[key][n])
            cells.append(s)
        u = unit if hib else "s, lower is better"
        rows.append([t, u] + cells + [ratio_cell(meds.get(a), meds.get(b), hib) for a, b in ratios])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", required=True, metavar="NAME=DIR",
                    help="a directory to measure, in run order; repeat. Names local, bindfs, "
                         "moosefs and jfs get the ratio columns.")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 MiB file, 3 s per random line, 200 files (unless set)")
    ap.add_argument("--size-mib", type=int, help="file size for the fio lines (default 1024)")
    ap.add_argument("--runtime", type=int, help="seconds per random line (default 20)")
    ap.add_argument("--files", type=int, help="files for create/stat/unlink (default 10000)")
    ap.add_argument("--tree-files", type=int, help="4 KiB files in the cp/tar tree (default 2000)")
    ap.add_argument("--untar-files", type=int, help="1 KiB files in the untar archive (default 20000)")
    ap.add_argument("--small", action="store_true", help="only the small-file and metadata lines")
    ap.add_argument("--jfs-cli", metavar="PATH",
                    help="the jfs command, to add the RPC lines (jfs bench meta) to the jfs target")
    ap.add_argument("--json", metavar="FILE", help="also write every sample to FILE")
    ap.add_argument("--only", metavar="KEY,KEY", type=lambda v: [k for k in v.split(",") if k],
                    help="run only these lines (keys: seqwrite, seqread, create1, stat4, ...)")
    ap.add_argument("--ratio", action="append", default=[], metavar="A/B",
                    help="also print target A's speed relative to target B's (e.g. tls/plain)")
    args = ap.parse_args()
    q = args.quick
    args.size_mib = args.size_mib or (64 if q else 1024)
    args.runtime = args.runtime or (3 if q else 20)
    args.files = args.files or (200 if q else 10000)
    args.tree_files = args.tree_files or (200 if q else 2000)
    args.untar_files = args.untar_files or (200 if q else 20000)

    targets = []
    for t in args.target:
        name, sep, d = t.partition("=")
        if not sep or not os.path.isdir(d):
            ap.error(f"--target {t!r}: expected NAME=DIR with an existing directory")
        targets.append((name, d))
    names = [n for n, _ in targets]
    if not args.small and shutil.which("fio") is None:
        sys.exit("bench.py: fio not found (apt-get install fio)")

    if "jfs" in names:
        ratios = [("jfs", b) for b in ("moosefs", "local") if b in names]
    else:  # a run without jfs (testing the bench): MooseFS against the disk
        ratios = [("moosefs", "local")] if {"moosefs", "local"} <= set(names) else []

    for r in args.ratio:
        a, sep, b = r.partition("/")
        if not sep or a not in names or b not in names:
            ap.error(f"--ratio {r!r}: expected A/B with two target names")
        ratios.append((a, b))
    lines = [l for l in LINES if not args.small or l[0] in SMALL]
    if args.only:
        unknown = set(args.only) - {l[0] for l in LINES}
        if unknown:
            ap.error(f"--only: unknown line(s) {', '.join(sorted(unknown))}")
        lines = [l for l in lines if l[0] in args.only]
    if args.jfs_cli and "jfs" in names:
        lines += RPC_LINES
    results = {key: {n: [] for n in names} for key, *_ in lines}
    results["floor"] = []
    tmpdir = tempfile.mkdtemp(prefix="jfs-bench-")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t_start = time.monotonic()
    pool = multiprocessing.get_context("fork").Pool(4)
    # SIGTERM (bench.sh forwards Ctrl-C as SIGTERM) unwinds like Ctrl-C, so
    # that the finally blocks stop fio and remove the scratch files. Set
    # after the pool forks: its workers just die.
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        src_tree = os.path.join(tmpdir, "tree")
        make_tree(src_tree, args.tree_files)
        make_archive(os.path.join(tmpdir, "untar.tar"), args.untar_files)
        for rep in range(1, args.reps + 1):
            for name, d in targets:
                log(f"rep {rep}/{args.reps}, {LABELS.get(name, name)} ({d}), "
                    f"{(time.monotonic() - t_start) / 60:.1f} min in")
                run_target(name, d, args, src_tree, tmpdir, pool, results, rep)
    except KeyboardInterrupt:
        log("bench.py: interrupted; scratch files removed")
        sys.exit(130)
    finally:
        pool.terminate()
        shutil.rmtree(tmpdir, ignore_errors=True)

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    print(f"# {started}; {os.cpu_count()} CPUs, {mem:.0f} GiB; kernel {os.uname().release}; "
          f"{args.reps} repetition(s), interleaved; {(time.monotonic() - t_start) / 60:.1f} min")
    print(f"# fio --ioengine=psync, {args.size_mib} MiB file, {args.runtime} s per random line; "
          f"tree of {args.tree_files:,} files of 4 KiB; {args.files:,} files for create/stat/unlink")
    print("# cells: median (min–max) over the repetitions. Ratios on medians, as speed: "
          "> 1 = the first is faster (for the seconds lines: time of the second / time of the first).")
    print()
    print_table(targets, results, ratios, args, lines)
    floors = results["floor"]
    if floors:
        med = lambda k: statistics.median(f[k] for f in floors)
        print()
        print(f"Floor for one synchronous client on this machine (`jfs bench meta`, median of {len(floors)}): "
              f"round trip {med('round_trip_ms'):.3f} ms + fsync {med('fsync_ms'):.3f} ms = "
              f"{med('floor_ms'):.3f} ms, {med('floor_ops_per_sec'):,.0f} ops/s. Compare the one-worker "
              f"and 1-client create/unlink lines with it.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "targets": targets, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
