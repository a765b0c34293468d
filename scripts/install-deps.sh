#!/usr/bin/env bash
# Installs everything jfs needs to build, run and test on Debian 12, as root.
# Safe to run again: apt only installs what is missing, rustup runs only when
# there is no cargo, and /etc/fuse.conf is edited only if needed.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps.sh: run as root (it uses apt-get and edits /etc/fuse.conf)" >&2
    exit 1
fi

packages=(
    # build
    build-essential clang libclang-dev protobuf-compiler pkg-config git curl ca-certificates
    # run: FUSE and the mount helper
    fuse3 util-linux
    # the tools the tests and the benchmark drive
    rsync attr acl bindfs coreutils tar diffutils findutils procps python3
    # the network-partition test cuts a metad off with nftables
    nftables
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    echo "install-deps.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "install-deps.sh: Debian packages already installed"
fi

# Rust: only when cargo is not already there (rustup puts it in ~/.cargo/bin).
if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if command -v cargo >/dev/null 2>&1; then
    echo "install-deps.sh: $(cargo --version) found"
else
    echo "install-deps.sh: installing Rust with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
    cargo --version
fi

# Let mounts use allow_other (jfs local up mounts with it so every user sees the files).
if ! grep -qE '^[[:space:]]*user_allow_other' /etc/fuse.conf 2>/dev/null; then
    echo "user_allow_other" >> /etc/fuse.conf
    echo "install-deps.sh: enabled user_allow_other in /etc/fuse.conf"
fi

# /dev/fuse must exist for any mount to work.
if [[ ! -c /dev/fuse ]]; then
    modprobe fuse 2>/dev/null || true
fi
if [[ ! -c /dev/fuse ]]; then
    echo "install-deps.sh: /dev/fuse is missing and 'modprobe fuse' did not create it;" \
         "jfs needs FUSE (in a container, start it with --device /dev/fuse --cap-add SYS_ADMIN)" >&2
    exit 1
fi
