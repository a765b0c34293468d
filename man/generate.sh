#!/usr/bin/env bash
# Writes the generated man pages: man/PAGE from the template man/src/PAGE.in and the clap
# definitions of the program the template names (`.\" jfs-man: command PROGRAM ...`), by running
# `PROGRAM --help-man < TEMPLATE`. mount.jfs.8 and jfs.toml.5 are hand-written and not touched.
#
#   bash man/generate.sh [OUTDIR]     # default OUTDIR: man/ itself
#
# The programs come from $JFS_BIN_DIR (default: $CARGO_TARGET_DIR/release, CARGO_TARGET_DIR
# defaulting to /var/cache/jfs-target as in scripts/test.sh): build them first with
# `cargo build --release --workspace`. tests/tests/man_pages.rs runs this into a temporary
# directory and fails when a page in man/ differs, so commit what it writes.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
bin_dir=${JFS_BIN_DIR:-${CARGO_TARGET_DIR:-/var/cache/jfs-target}/release}
mkdir -p "$out"

for template in "$here"/src/*.in; do
    page=$(basename "$template" .in)
    prog=$(sed -n 's/^\.\\" jfs-man: command \([^ ]*\).*/\1/p' "$template" | head -n 1)
    if [[ -z $prog ]]; then
        echo "generate.sh: $template has no '.\\\" jfs-man: command PROGRAM' line" >&2
        exit 1
    fi
    if [[ ! -x $bin_dir/$prog ]]; then
        echo "generate.sh: $bin_dir/$prog is missing; build with cargo build --release --workspace or set JFS_BIN_DIR" >&2
        exit 1
    fi
    "$bin_dir/$prog" --help-man < "$template" > "$out/$page.tmp"
    mv "$out/$page.tmp" "$out/$page"
done
