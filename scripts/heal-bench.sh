#!/usr/bin/env bash
# How fast jfs restores lost copies, and what that costs the foreground.
#
# Starts a throw-away local cluster (3 metad, 3 blockd, replication 3) on
# its own loopback address plus a 4th blockd, writes SIZE MiB (default
# 1024) of files, waits until `jfs fsck` sees every block at 3 copies, then
# `kill -9`s blockd1. Once metad declares it dead, the healer copies every
# block it held to the other blockds; the script times that until fsck is
# healthy again and reports GiB re-replicated per minute. While healing
# runs it writes a 256 MiB file with dd (conv=fsync) and compares its rate
# with the same write before the failure. Prints one markdown table for
# docs/PERFORMANCE.md. Run as root after building (target/release or
# $JFS_BIN_DIR); everything lives in /var/tmp/jfs-heal and is removed at
# the end.
#
#   bash scripts/heal-bench.sh [SIZE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=${1:-1024}
bin=${JFS_BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}
state=/var/tmp/jfs-heal
mnt=$state-mnt
ip=127.0.9.1
jfs() { "$bin/jfs" --conf "$state/jfs.toml" "$@"; }
log() { echo "heal-bench: $*" >&2; }

b4pid=
cleanup() {
    [[ -n $b4pid ]] && kill -9 "$b4pid" 2>/dev/null || true
    "$bin/jfs" local down --dir "$state" >/dev/null 2>&1 || true
    rm -rf "$state" "$mnt"
}
trap cleanup EXIT
cleanup
mkdir -p "$mnt"
PATH=$bin:$PATH "$bin/jfs" local up --dir "$state" --ip "$ip" "$mnt" >&2
mkdir -p "$state/blockd4"
"$bin/jfs-blockd" --conf "$state/jfs.toml" --data-dir "$state/blockd4" --listen "$ip:8231" \
    2>"$state/logs/blockd4.log" &
b4pid=$!

wait_for() { # what, seconds, command...
    local what=$1 t=$2; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || { log "timed out waiting for $what"; exit 1; }
        sleep 0.2
    done
}
live4() { [[ $(jfs admin blockd list | grep -c ' live ') -eq 4 ]]; }
wait_for "4 live blockds" 60 live4

dd_rate() { # file -> MiB/s of a 256 MiB fsynced write
    local t0 t1
    t0=$(date +%s.%N)
    dd if=/dev/zero of="$1" bs=1M count=256 conv=fsync status=none
    t1=$(date +%s.%N)
    echo "scale=1; 256 / ($t1 - $t0)" | bc
}

log "writing $size_mib MiB"
for ((i = 0; i < size_mib / 64; i++)); do
    head -c $((64 << 20)) /dev/urandom >"$mnt/f$i"
done
sync
wait_for "every block at 3 copies" 300 jfs fsck
quiet=$(dd_rate "$mnt/quiet")
rm -f "$mnt/quiet"

b1=$(jfs admin blockd list | awk -v a="$ip:8201" '$2 == a {print $1}')
held=$(jfs admin blockd list | awk -v a="$ip:8201" '$2 == a {print $(NF-2)}')
log "killing blockd1 ($b1, $held blocks)"
kill -9 "$(cat "$state/run/blockd1.pid")"
dead() { jfs admin blockd list | awk -v id="$b1" '$1 == id {print $3}' | grep -qx dead; }
wait_for "blockd1 declared dead" 60 dead
t0=$(date +%s.%N)
busy=$(dd_rate "$mnt/busy")
wait_for "every block back at 3 copies" 3600 jfs fsck
t1=$(date +%s.%N)
secs=$(echo "$t1 - $t0" | bc)
gib=$(echo "scale=3; $held * 4 / 1024" | bc)
rate=$(echo "scale=2; $gib * 60 / $secs" | bc)
echo "| healing after losing 1 of 4 blockds ($(git describe --always --dirty)) | value |"
echo "|---|---|"
echo "| data re-replicated | $held blocks, ≈ $gib GiB |"
echo "| time from dead to fsck healthy | ${secs} s |"
echo "| healing rate | $rate GiB/min |"
echo "| 256 MiB fsynced dd write, quiet | $quiet MiB/s |"
echo "| same, while healing | $busy MiB/s |"
