#!/usr/bin/env bash
# Runs every jfs test: the unit tests of every crate, then the integration
# tests (tests/: real metad, blockd and jfs-mountd processes and real FUSE
# mounts). Installs missing dependencies first, and installs the build
# (scripts/install.sh) so `mount -t jfs` is tested too. Needs root and /dev/fuse.
#
# CARGO_TARGET_DIR defaults to /var/cache/jfs-target, outside the clone, so
# repeated runs on one machine reuse the build. Extra arguments go to the
# integration test binaries, e.g. `bash scripts/test.sh close_to_open`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# The integration tests mount filesystems and start daemons: without root or
# FUSE they cannot run, and skipping them would report a pass that means nothing.
if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: FAILED: the integration tests must run as root (they mount FUSE filesystems)" >&2
    exit 1
fi
if [[ ! -c /dev/fuse ]]; then
    echo "test.sh: FAILED: /dev/fuse is missing; the integration tests need FUSE" >&2
    exit 1
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/jfs-target}"
mkdir -p "$CARGO_TARGET_DIR"
CARGO_TARGET_DIR="$(realpath "$CARGO_TARGET_DIR")"
export JFS_BIN_DIR="$CARGO_TARGET_DIR/release"
# Everything the integration tests create (state, mounts) goes under one
# directory of this run, so cleanup below touches nothing else.
export JFS_TEST_TMPDIR
JFS_TEST_TMPDIR="$(mktemp -d /tmp/jfs-test-run-XXXXXX)"
chmod 755 "$JFS_TEST_TMPDIR"

cleanup() {
    # Normally every test cleans up after itself; this catches a run killed by the timeout.
    local m pidfile pid
    { grep -F " $JFS_TEST_TMPDIR/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r |
        while read -r m; do
            echo "test.sh: cleanup: detaching leftover mount $m" >&2
            umount -l "$m" || true
        done
    for pidfile in "$JFS_TEST_TMPDIR"/*/state/run/*.pid; do
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$JFS_TEST_TMPDIR"; then
            echo "test.sh: cleanup: killing leftover daemon $pid ($pidfile)" >&2
            kill -9 "$pid" || true
        fi
    done
    rm -rf --one-file-system "$JFS_TEST_TMPDIR" 2>/dev/null || true
}
trap cleanup EXIT

echo "test.sh: building (target dir $CARGO_TARGET_DIR)"
# `cargo test` does not build other packages' binaries; the integration tests run them.
cargo build --release --workspace --bins
cargo test --release --workspace --no-run
# Install this build (to /usr/local/bin and /sbin/mount.jfs) so that
# `mount -t jfs` is tested with the helper the install step puts in place.
bash scripts/install.sh

status=0
echo "test.sh: unit tests"
cargo test --release --workspace --exclude jfs-tests --no-fail-fast || status=1
# The blockd crash test kills the real binary mid-write; it is opt-in for a
# plain `cargo test` because it needs the built daemon.
JFS_BLOCKD_BIN="$JFS_BIN_DIR/jfs-blockd" cargo test --release -p jfs-blockd -- --ignored kill9 || status=1

echo "test.sh: integration tests"
# Two tests at a time (each runs a 7-process cluster); the time limit keeps a
# hung mount from eating the whole CI budget.
timeout --kill-after=60 65m cargo test --release -p jfs-tests --no-fail-fast -- --test-threads=2 "$@" || status=1

if ((status)); then
    echo "test.sh: FAILED (see the failures above; logs of failed integration tests are in /tmp/jfs-test-failures/)" >&2
else
    echo "test.sh: all tests passed"
fi
exit "$status"
