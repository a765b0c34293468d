#!/bin/bash
# Compares metadata speed of two builds of jfs on this machine, interleaved.
#
#   bash scripts/meta-ab.sh OLD_BIN_DIR NEW_BIN_DIR [REPS]
#
# Each BIN_DIR holds jfs, jfs-metad, jfs-blockd and jfs-mountd of one build
# (e.g. a copy of target/release made before a change). For each repetition
# and build: a fresh `jfs local up` (no mirror) under /var/tmp/jfs-meta-ab,
# `jfs bench meta --clients 1,4,16 --files 3000` over RPC, then 1,000
# open(O_CREAT|O_EXCL)+close and 1,000 unlink from one process through the
# mount, then 1,000 files of 4 KiB written (create, write, close) and
# stat'ed. Prints each run; take medians. Run as root on a quiet machine.
# META_AB_RPC=0 skips the RPC part.
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n 2,12p "$0" >&2; exit 2; }
[[ $EUID -eq 0 ]] || { echo "meta-ab.sh: run as root (mounts)" >&2; exit 1; }
old=$1 new=$2 reps=${3:-3}
base=/var/tmp/jfs-meta-ab
mkdir -p "$base"
down() { "$1/jfs" local down --dir "$base/c" >/dev/null 2>&1 || true; rm -rf "$base/c"; }
for rep in $(seq 1 "$reps"); do
  for v in old new; do
    b=$old; [[ $v == new ]] && b=$new
    down "$b"
    "$b/jfs" local up --dir "$base/c" --ip 127.0.73.1 --no-mirror "$base/mnt" >/dev/null
    echo "== repetition $rep, $v ($b)"
    if [[ ${META_AB_RPC:-1} != 0 ]]; then
      "$b/jfs" bench meta --conf "$base/c/jfs.toml" --clients 1,4,16 --files 3000 2>&1 | tail -4
    fi
    python3 - "$base/mnt/ab" <<'PY'
import os, sys, time
d = sys.argv[1]; os.makedirs(d, exist_ok=True); n = 1000
t = time.perf_counter()
for i in range(n):
    os.close(os.open(f"{d}/f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
dc = time.perf_counter() - t; t = time.perf_counter()
for i in range(n):
    os.unlink(f"{d}/f{i}")
du = time.perf_counter() - t
block = os.urandom(4096)
t = time.perf_counter()
for i in range(n):
    fd = os.open(f"{d}/s{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, block)
    os.close(fd)
dw = time.perf_counter() - t
time.sleep(1.5)  # past the attribute and entry timeouts: every stat asks
t = time.perf_counter()
for i in range(n):
    os.stat(f"{d}/s{i}")
ds = time.perf_counter() - t
print(f"through the mount, 1 worker: create {n / dc:.0f}/s, unlink {n / du:.0f}/s, "
      f"4 KiB files {n / dw:.0f}/s, stat {n / ds:.0f}/s")
PY
    down "$b"
  done
done
