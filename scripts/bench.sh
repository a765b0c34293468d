#!/usr/bin/env bash
# The jfs benchmark: the same workload, in one run, on the jfs mount, on a
# local directory and (if bindfs is installed) on bindfs over a local
# directory, the FUSE-only ceiling. Prints MiB/s and ops/s per target and the
# jfs/local and jfs/bindfs ratios. Writes nothing but its scratch files,
# which it removes. Run as root (to drop the page cache before reads).
#
#   bash scripts/bench.sh [--jfs DIR] [--local DIR] [--size-mib N] [--files N] [--no-bindfs]
#
# Defaults: --jfs /mnt/jfs (start it with `bash scripts/local-up.sh`),
# --local /var/tmp/jfs-bench, 1024 MiB, 10000 files.
set -euo pipefail
cd "$(dirname "$0")/.."

jfs_dir=/mnt/jfs
local_dir=/var/tmp/jfs-bench
size_mib=1024
files=10000
use_bindfs=1
while (($#)); do
    case "$1" in
        --jfs) jfs_dir="$2"; shift 2 ;;
        --local) local_dir="$2"; shift 2 ;;
        --size-mib) size_mib="$2"; shift 2 ;;
        --files) files="$2"; shift 2 ;;
        --no-bindfs) use_bindfs=0; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

if ! mountpoint -q "$jfs_dir"; then
    echo "bench.sh: $jfs_dir is not a mount; start jfs first with 'bash scripts/local-up.sh'" \
         "or pass --jfs DIR" >&2
    exit 1
fi
mkdir -p "$local_dir"

targets=(--target "local=$local_dir")
bindfs_mnt=""
cleanup() {
    if [[ -n $bindfs_mnt ]]; then
        umount "$bindfs_mnt" 2>/dev/null || umount -l "$bindfs_mnt" 2>/dev/null || true
        rmdir "$bindfs_mnt" "$local_dir/bindfs-src" 2>/dev/null || true
    fi
}
trap cleanup EXIT
if ((use_bindfs)) && command -v bindfs >/dev/null 2>&1; then
    mkdir -p "$local_dir/bindfs-src"
    bindfs_mnt=$(mktemp -d /tmp/jfs-bench-bindfs-XXXXXX)
    bindfs "$local_dir/bindfs-src" "$bindfs_mnt"
    targets+=(--target "bindfs=$bindfs_mnt")
fi
targets+=(--target "jfs=$jfs_dir")

echo "# jfs $(git describe --always --dirty 2>/dev/null || echo '?'): bash scripts/bench.sh --size-mib $size_mib --files $files"
python3 scripts/bench.py --size-mib "$size_mib" --files "$files" "${targets[@]}"
