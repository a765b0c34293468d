#!/usr/bin/env bash
# The jfs benchmark: the same lines, in one run, on
#   * a local directory (the disk's ceiling: the baseline figures),
#   * bindfs over a local directory, if bindfs is installed (the FUSE-only
#     ceiling: what any FUSE filesystem pays in kernel round trips),
#   * MooseFS 3.0.117 live, the peer (master + 3 chunkservers on loopback,
#     goal 1, started here by scripts/moosefs-local.sh and stopped on exit),
#   * the jfs mount (replication as its namespace is configured).
# Each repetition runs every line on every target in that order (rep 1:
# local, bindfs, MooseFS, jfs; rep 2: ...), 3 repetitions by default. The
# lines (details in scripts/bench.py): fio on a 1 GiB file (sequential write
# with end_fsync and cold sequential read, MiB/s; 4 KiB random write buffered
# and O_DIRECT, 4 KiB random read buffered 1 job, buffered 4 jobs and
# O_DIRECT, 20 s each, IOPS); `cp -r` in and `tar` out of a tree of 2,000
# files of 4 KiB (seconds, lower is better); create/stat/unlink of 10,000
# empty files with 1 and 4 workers, in one directory and in a directory per
# worker (ops/s); untar of 20,000 files of 1 KiB (seconds); and, for jfs,
# `jfs bench meta` over RPC with 1, 4 and 16 clients beside the measured
# floor of one synchronous client. --small runs only the small-file and
# metadata lines. It prints one markdown table
# (median and min–max per target, jfs/MooseFS and jfs/local ratios) headed by
# the command and `git describe`, ready for docs/PERFORMANCE.md; progress goes
# to stderr. Run as root: it installs fio and MooseFS with apt-get if missing,
# mounts, and drops the page cache. Network: loopback only.
#
#   bash scripts/bench.sh [--jfs DIR | --no-jfs] [--reps N] [--quick]
#                         [--local DIR] [--no-bindfs] [--no-moosefs] [--goal N]
#                         [--size-mib N] [--runtime S] [--files N] [--tree-files N]
#                         [--untar-files N] [--small] [--json FILE]
#
# Defaults: --jfs /mnt/jfs (start it with `bash scripts/local-up.sh`; it must
# be a mount unless --no-jfs), --local /var/tmp/jfs-bench, --reps 3, 1024 MiB,
# 20 s per random line, 10,000 files, a tree of 2,000 files, MooseFS goal 1
# (--goal 3 to compare with jfs at replication 3). --quick is a
# smoke run: 64 MiB, 3 s, 200 files, tree of 200 (a few minutes).
# MooseFS lives in /var/tmp/jfs-bench-mfs (configs and logs stay there).
set -euo pipefail
cd "$(dirname "$0")/.."

orig_args=("$@")
jfs_dir=/mnt/jfs
use_jfs=1
local_dir=/var/tmp/jfs-bench
mfs_dir=/var/tmp/jfs-bench-mfs
use_bindfs=1
use_moosefs=1
py_args=()
while (($#)); do
    case "$1" in
        --jfs) jfs_dir="$2"; shift 2 ;;
        --no-jfs) use_jfs=0; shift ;;
        --local) local_dir="$2"; shift 2 ;;
        --no-bindfs) use_bindfs=0; shift ;;
        --no-moosefs) use_moosefs=0; shift ;;
        --goal) export MFS_GOAL="$2"; shift 2 ;;
        --quick) py_args+=(--quick); shift ;;
        --small) py_args+=(--small); shift ;;
        --reps|--size-mib|--runtime|--files|--tree-files|--untar-files|--json) py_args+=("$1" "$2"); shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

[[ $EUID -eq 0 ]] || { echo "bench.sh: run as root (apt-get, mounts, drop_caches)" >&2; exit 1; }
if ((use_jfs)) && ! mountpoint -q "$jfs_dir"; then
    echo "bench.sh: $jfs_dir is not a mount; start jfs first with 'bash scripts/local-up.sh'," \
         "pass --jfs DIR, or --no-jfs to measure the other targets only" >&2
    exit 1
fi

# What the run needs, installed if missing (apt-get update only if a
# package is not found).
pkgs=()
command -v fio >/dev/null || pkgs+=(fio)
if ((use_moosefs)); then
    command -v mfsmaster >/dev/null || pkgs+=(moosefs-master)
    command -v mfschunkserver >/dev/null || pkgs+=(moosefs-chunkserver)
    command -v mfsmount >/dev/null || pkgs+=(moosefs-client)
    command -v mfscli >/dev/null || pkgs+=(moosefs-cli)
fi
if ((${#pkgs[@]})); then
    echo "bench.sh: installing ${pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q "${pkgs[@]}" >&2; then
        apt-get update -q >&2
        apt-get install -y -q "${pkgs[@]}" >&2
    fi
fi

mkdir -p "$local_dir"
targets=(--target "local=$local_dir")
bindfs_mnt=""
mfs_started=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $bindfs_mnt ]]; then
        umount "$bindfs_mnt" 2>/dev/null || umount -l "$bindfs_mnt" 2>/dev/null || true
        rmdir "$bindfs_mnt" 2>/dev/null || true
        rmdir "$local_dir/bindfs-src" 2>/dev/null || true
    fi
    if ((mfs_started)); then
        bash scripts/moosefs-local.sh stop "$mfs_dir" || rc=1
    fi
    exit "$rc"
}
# bench.py runs in the background (see the end) so that a signal reaches
# these traps at once; they pass it on as SIGTERM and wait for bench.py to
# stop fio and remove its scratch files, then cleanup unmounts and stops.
py_pid=""
on_signal() {
    if [[ -n $py_pid ]]; then
        kill -TERM "$py_pid" 2>/dev/null || true
        wait "$py_pid" 2>/dev/null || true
    fi
    exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

if ((use_bindfs)) && command -v bindfs >/dev/null 2>&1; then
    mkdir -p "$local_dir/bindfs-src"
    bindfs_mnt=$(mktemp -d /tmp/jfs-bench-bindfs-XXXXXX)
    bindfs "$local_dir/bindfs-src" "$bindfs_mnt"
    targets+=(--target "bindfs=$bindfs_mnt")
fi
if ((use_moosefs)); then
    mfs_started=1
    mfs_mnt=$(bash scripts/moosefs-local.sh start "$mfs_dir")
    targets+=(--target "moosefs=$mfs_mnt")
fi
if ((use_jfs)); then
    targets+=(--target "jfs=$jfs_dir")
fi

# The header: what ran, on what, with which versions.
cmdline="bash scripts/bench.sh"
((${#orig_args[@]})) && printf -v cmdline '%s%s' "$cmdline" "$(printf ' %q' "${orig_args[@]}")"
versions="$(fio --version)"
if ((use_moosefs)); then
    versions+=", MooseFS $(mfsmaster -v 2>&1 | grep -o '[0-9][0-9.]*' | head -1) (master + 3 chunkservers on loopback, goal ${MFS_GOAL:-1}, nice 0,"
    versions+=" default durability: changelog written in the background, chunk files not fsynced on close)"
fi
if [[ -n $bindfs_mnt ]]; then
    versions+=", bindfs $(bindfs --version 2>&1 | grep -o '[0-9][0-9.]*' | head -1)"
fi
echo "# jfs $(git describe --always --dirty 2>/dev/null || echo '?'): $cmdline"
echo "# $versions"
echo "# local: $local_dir on $(df --output=source,fstype "$local_dir" | tail -1 | tr -s ' ')"
if ((use_jfs)); then
    echo "# jfs: $jfs_dir ($(awk -v m="$jfs_dir" '$2 == m {print $1, $3}' /proc/mounts | head -1))"
    if command -v jfs >/dev/null; then
        timeout 10 jfs admin list-namespaces 2>/dev/null | sed 's/^/#   /' || true
    fi
fi
if ((use_jfs)) && command -v jfs >/dev/null; then
    # The RPC lines (jfs bench meta) run against the cluster of the default config.
    py_args+=(--jfs-cli "$(command -v jfs)")
fi
python3 scripts/bench.py "${py_args[@]}" "${targets[@]}" &
py_pid=$!
wait "$py_pid"
