#!/usr/bin/env bash
# What mutual TLS costs: the same benchmark lines, interleaved in one run,
# on two local clusters that differ only in security.tls.enabled (each
# 3 metad + 3 blockd, no mirror, on its own loopback address): sequential
# write and cold read (fio, MiB/s) and create/stat of empty files with 1 and
# 4 workers (ops/s). Prints bench.py's table with a tls/plain column
# (1.00 = no cost; the issue's bound is within 10 %).
#
#   bash scripts/tls-bench.sh [--reps N] [--size-mib N] [--files N] [--quick]
#
# Run as root after scripts/install.sh (it uses the installed jfs, or
# JFS=path/to/jfs). Both clusters are stopped and their state removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $EUID -eq 0 ]] || { echo "tls-bench.sh: run as root (mounts, drop_caches)" >&2; exit 1; }
jfs=${JFS:-$(command -v jfs || true)}
[[ -x $jfs ]] || { echo "tls-bench.sh: no jfs binary; run scripts/install.sh or set JFS=" >&2; exit 1; }
command -v fio >/dev/null || apt-get install -y -q fio >&2

base=/var/tmp/jfs-tls-bench
cleanup() {
    for side in on off; do
        "$jfs" local down --dir "$base/$side" >/dev/null 2>&1 || true
    done
    rm -rf "$base"
}
trap cleanup EXIT
cleanup
mkdir -p "$base"
"$jfs" local up --dir "$base/on" --ip 127.0.61.1 --no-mirror "$base/mnt-on" >&2
"$jfs" local up --dir "$base/off" --ip 127.0.62.1 --no-mirror --no-tls "$base/mnt-off" >&2

echo "# jfs $(git describe --always --dirty 2>/dev/null || echo '?'): bash scripts/tls-bench.sh $*"
echo "# tls: $base/mnt-on (security.tls.enabled = true); plain: $base/mnt-off (false); $(fio --version)"
python3 scripts/bench.py --target "tls=$base/mnt-on" --target "plain=$base/mnt-off" --ratio tls/plain \
    --only seqwrite,seqread,create1,stat1,create4,stat4 "$@"
