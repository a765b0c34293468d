#!/usr/bin/env bash
# Builds the jfs packages: jfs-server (jfs-metad, jfs-blockd, systemd units,
# /etc/jfs/jfs.toml) and jfs-client (jfs-mountd, /sbin/mount.jfs, the jfs CLI),
# each as a .deb (cargo-deb) and an .rpm (cargo-generate-rpm), into
# $CARGO_TARGET_DIR/packages/ (default /var/cache/jfs-target/packages/).
#
# Packs the workspace's release build: it runs `cargo build --release
# --workspace --bins`, which does nothing when the build is current (as in
# scripts/test.sh); --no-build skips even that and only checks the binaries
# are there. Man pages in man/ and shell completions (`jfs completions SHELL`)
# go in when they exist. The tools come from scripts/install-deps.sh.
#
#   bash packaging/build.sh [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

build=1
case "${1:-}" in
    "") ;;
    --no-build) build=0 ;;
    *) echo "usage: bash packaging/build.sh [--no-build]" >&2; exit 2 ;;
esac

if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
for tool in cargo-deb cargo-generate-rpm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build.sh: $tool is not installed; run scripts/install-deps.sh (as root) first" >&2
        exit 1
    fi
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/jfs-target}"
mkdir -p "$CARGO_TARGET_DIR"
CARGO_TARGET_DIR="$(realpath "$CARGO_TARGET_DIR")"
release="$CARGO_TARGET_DIR/release"
out="$CARGO_TARGET_DIR/packages"
# The manifests' `target/release/` means this directory (both tools map it
# to their target dir), so the packages get stripped copies while cargo's
# own binaries keep their debug info.
stage="$out/stage"

if ((build)); then
    echo "build.sh: cargo build --release (target dir $CARGO_TARGET_DIR)"
    cargo build --release --workspace --bins
fi
bins=(jfs jfs-metad jfs-blockd jfs-mountd)
for b in "${bins[@]}"; do
    if [[ ! -x "$release/$b" ]]; then
        echo "build.sh: $release/$b is missing; run \`cargo build --release --workspace --bins\` first" >&2
        exit 1
    fi
done

# The version of the workspace, so the packages never disagree with `jfs --version`.
version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
if [[ -z "$version" ]]; then
    echo "build.sh: cannot find version in [workspace.package] of $repo/Cargo.toml" >&2
    exit 1
fi

rm -rf "$stage"
mkdir -p "$stage/release" "$out"
rm -f "$out"/*.deb "$out"/*.rpm
for b in "${bins[@]}"; do
    # Debug info is 2/3 of each binary; symbols stay, so backtraces still name functions.
    strip --strip-debug -o "$stage/release/$b" "$release/$b"
done

server_share="$stage/release/server-share"
client_share="$stage/release/client-share"
for pkg in server client; do
    install -D -m 0644 packaging/copyright "$stage/release/$pkg-share/doc/jfs-$pkg/copyright"
done

# Man pages: the daemons' pages with the server, the rest with the client.
man_count=0
shopt -s nullglob
for page in man/*.1 man/*.5 man/*.8; do
    name=$(basename "$page")
    section=${name##*.}
    case "$name" in
        jfs-metad.* | jfs-blockd.*) dest=$server_share ;;
        *) dest=$client_share ;;
    esac
    mkdir -p "$dest/man/man$section"
    gzip -9n <"$page" >"$dest/man/man$section/$name.gz"
    man_count=$((man_count + 1))
done
shopt -u nullglob

# Completions come from the built CLI, so they match its flags.
completions=no
if "$release/jfs" completions bash >/dev/null 2>&1; then
    mkdir -p "$client_share/bash-completion/completions" "$client_share/zsh/vendor-completions" \
        "$client_share/fish/vendor_completions.d"
    "$release/jfs" completions bash >"$client_share/bash-completion/completions/jfs"
    "$release/jfs" completions zsh >"$client_share/zsh/vendor-completions/_jfs"
    "$release/jfs" completions fish >"$client_share/fish/vendor_completions.d/jfs.fish"
    completions=yes
fi
echo "build.sh: jfs $version: $man_count man page(s), shell completions: $completions"

for pkg in server client; do
    echo "build.sh: jfs-$pkg .deb"
    # The packaging workspace is separate from the main one; pointing its
    # target dir at the stage makes `target/release/` the stage.
    (cd packaging && CARGO_TARGET_DIR="$stage" cargo deb --quiet --manifest-path "$pkg/Cargo.toml" \
        --no-build --no-strip --fast --deb-version "$version-1" --output "$out/")
    echo "build.sh: jfs-$pkg .rpm"
    (cd "packaging/$pkg" && cargo generate-rpm --target-dir "$stage" --output "$out/" \
        --set-metadata "version = \"$version\"" --set-metadata 'release = "1"')
done
rm -rf "$stage"
echo "build.sh: packages in $out:"
ls -1 "$out"
