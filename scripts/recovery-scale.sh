#!/usr/bin/env bash
# Recovery of a large namespace from the table store (docs/PERFORMANCE.md,
# issue 8's benchmark): N empty files are created over RPC by 16 clients
# (`jfs bench meta`, stopped once its create phase is done, so the files
# stay), the mirror is waited for (_synced=1 on every node), the metadata
# cluster is dropped, and `jfs local up --recovery` is timed to FINISH and a
# usable read-only mount; `jfs fs count` must be equal before and after.
#
# Usage: bash scripts/recovery-scale.sh [N] [STATE_DIR]
#   N          files to create (default 1000000)
#   STATE_DIR  a new local-cluster state directory (default
#              /var/tmp/jfs-recovery-scale); removed at the end
# Runs its own cluster on 127.0.77.1 beside any other; needs jfs on PATH
# (or JFS=/path/to/jfs) and the table store installed (install-deps.sh).
set -euo pipefail

N=${1:-1000000}
STATE=${2:-/var/tmp/jfs-recovery-scale}
MNT="$STATE.mnt"
IP=127.0.77.1
J=${JFS:-jfs}

if [[ -e "$STATE" ]]; then
    echo "recovery-scale: $STATE exists; remove it or name another directory" >&2
    exit 2
fi

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }

cleanup() {
    "$J" local down --dir "$STATE" >/dev/null 2>&1 || true
    rm -rf "$STATE" "$MNT"
}
trap cleanup EXIT

# Sum of one RPC method's served count over the three metads (only the
# leader serves namespace calls, so the sum survives a failover).
served() {
    local total=0 port n
    for port in 8102 8112 8122; do
        n=$(curl -sf "http://$IP:$port/metrics" |
            awk -v m="method=\"$1\"" 'index($0, "jfs_rpc_requests_total{") == 1 && index($0, m) { s += $NF } END { printf "%d", s }') || n=0
        total=$((total + n))
    done
    echo "$total"
}

wait_synced() {
    local deadline=$((SECONDS + $1)) rows
    while ((SECONDS < deadline)); do
        # One "node N: mirror _synced=1 ..." line per node (the table above
        # them repeats the flag, so a plain count would pass with 2 of 3).
        rows=$("$J" metastatus --detail --dir "$STATE" 2>/dev/null | grep -c '^node [0-9]*: mirror _synced=1' || true)
        if [[ "$rows" -ge 3 ]]; then
            return 0
        fi
        sleep 2
    done
    echo "recovery-scale: the mirror did not reach _synced=1 within $1 s" >&2
    "$J" metastatus --detail --dir "$STATE" >&2 || true
    return 1
}

log "starting a cluster with the mirror in $STATE"
"$J" local up --dir "$STATE" --ip "$IP" "$MNT" >/dev/null
conf="$STATE/jfs.toml"

before=$(served Mknod)
log "creating $N files over RPC with 16 clients"
"$J" bench meta --conf "$conf" --clients 16 --files "$N" >"$STATE.bench.log" 2>&1 &
bench=$!
t0=$SECONDS
while :; do
    sleep 5
    done_n=$(($(served Mknod) - before))
    if ((done_n >= N)); then
        break
    fi
    if ! kill -0 "$bench" 2>/dev/null; then
        echo "recovery-scale: jfs bench meta ended before its create phase was done:" >&2
        cat "$STATE.bench.log" >&2
        exit 1
    fi
done
# The stat phase has begun; nothing more is written. Stop before unlinks.
kill "$bench" 2>/dev/null || true
wait "$bench" 2>/dev/null || true
created_s=$((SECONDS - t0))
log "created $N files in ${created_s} s ($((N / (created_s > 0 ? created_s : 1))) /s)"

t1=$SECONDS
wait_synced 7200
log "_synced=1 on every node $((SECONDS - t1)) s after the last create"
count_before=$("$J" --conf "$conf" fs count jfs://default/)
log "fs count: $count_before"

"$J" local down --drop-metadata --dir "$STATE" >/dev/null
log "metadata cluster dropped; starting recovery"
t2=$(date +%s.%N)
"$J" local up --recovery --dir "$STATE" --ip "$IP" "$MNT" >/dev/null
t3=$(date +%s.%N)
log "recovery to FINISH and a mounted namespace: $(echo "$t3 - $t2" | bc) s"
grep -h "rows restored" "$STATE"/logs/metad*.log | tail -n 3 || true
count_after=$("$J" --conf "$conf" fs count jfs://default/)
if [[ "$count_after" != "$count_before" ]]; then
    echo "recovery-scale: fs count differs after recovery: before '$count_before', after '$count_after'" >&2
    exit 1
fi
log "fs count equal after recovery"
