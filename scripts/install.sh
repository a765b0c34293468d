#!/usr/bin/env bash
# Builds jfs in release mode and installs its binaries to /usr/local/bin, with
# /sbin/mount.jfs -> jfs-mountd so that `mount -t jfs NAME DIR -o conf=...`
# and /etc/fstab lines work. Honours CARGO_TARGET_DIR. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: run as root (it writes to /usr/local/bin and /sbin)" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# The same default as scripts/test.sh, so installing and testing share one build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/jfs-target}"
target="$CARGO_TARGET_DIR"
echo "install.sh: cargo build --release (target dir $target; the first build takes a while)"
cargo build --release --workspace --bins

for b in jfs jfs-metad jfs-blockd jfs-mountd; do
    # install(1) unlinks the old file before writing, so running daemons keep their binary (no ETXTBSY).
    install -m 0755 "$target/release/$b" "/usr/local/bin/$b"
done
ln -sfn /usr/local/bin/jfs-mountd /sbin/mount.jfs
echo "install.sh: installed jfs, jfs-metad, jfs-blockd, jfs-mountd in /usr/local/bin and /sbin/mount.jfs"
