#!/usr/bin/env bash
# From a fresh Debian 12 machine to a mounted jfs: installs dependencies,
# builds and installs jfs, then starts a local cluster (3 metad + 3 blockd,
# state in /var/lib/jfs/local) and mounts namespace `default` at /mnt/jfs.
# Run as root. Safe to run again. MOUNTPOINT (default /mnt/jfs) may be given.
set -euo pipefail
cd "$(dirname "$0")/.."

mnt="${1:-/mnt/jfs}"
bash scripts/install-deps.sh
bash scripts/install.sh
/usr/local/bin/jfs local up "$mnt"
echo
echo "jfs is mounted at $mnt. Try: ls -la $mnt; jfs metastatus --detail; jfs local down"
