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
    # moto (the second table-store implementation the mirror tests run on) lives in a venv
    python3-venv
    # the network-partition test cuts a metad off with nftables
    nftables
    # the man page test renders man/ with man and groff and lints it with mandoc
    man-db groff-base mandoc
    # packaging/build.sh builds .rpm files and the packaging test lists them with rpm;
    # systemd-analyze (in systemd) checks the units
    rpm systemd
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

# The table store of the local cluster and the tests: Dynoxide, a
# DynamoDB-compatible server on SQLite (docs/DECISIONS.md says why this one).
# Built from crates.io into /usr/local/bin, pinned so every machine runs the
# same server (crate dynoxide-rs 3.2.0 reports itself as "dynoxide 1.5.0").
DYNOXIDE_CRATE_VERSION=3.2.0
DYNOXIDE_REPORTS="dynoxide 1.5.0"
if [[ "$(/usr/local/bin/dynoxide --version 2>/dev/null)" != "$DYNOXIDE_REPORTS" ]]; then
    echo "install-deps.sh: building the table store server (dynoxide-rs $DYNOXIDE_CRATE_VERSION, a few minutes)"
    cargo install --quiet --locked --force --root /usr/local dynoxide-rs --version "$DYNOXIDE_CRATE_VERSION" \
        --no-default-features --features native-sqlite,http-server,cli
fi
echo "install-deps.sh: table store server: $(/usr/local/bin/dynoxide --version)"

# The second, independent DynamoDB implementation the mirror's contract test
# runs against: moto's server mode, in its own virtualenv (pinned).
MOTO_VERSION=5.1.22
if [[ "$(/opt/jfs-moto/bin/python -c 'import moto; print(moto.__version__)' 2>/dev/null)" != "$MOTO_VERSION" ]]; then
    echo "install-deps.sh: installing moto $MOTO_VERSION (server mode) into /opt/jfs-moto"
    python3 -m venv /opt/jfs-moto
    /opt/jfs-moto/bin/pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi
echo "install-deps.sh: second table store: moto $(/opt/jfs-moto/bin/python -c 'import moto; print(moto.__version__)')"

# packaging/build.sh builds the .deb and .rpm packages with these two cargo
# subcommands (pinned so every machine builds the same packages).
CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
if [[ "$(cargo deb --version 2>/dev/null)" != *"$CARGO_DEB_VERSION"* ]]; then
    echo "install-deps.sh: installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --quiet --locked --force cargo-deb --version "$CARGO_DEB_VERSION"
fi
if [[ "$(cargo generate-rpm --version 2>/dev/null)" != *"$CARGO_GENERATE_RPM_VERSION"* ]]; then
    echo "install-deps.sh: installing cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION"
    cargo install --quiet --locked --force cargo-generate-rpm --version "$CARGO_GENERATE_RPM_VERSION"
fi
echo "install-deps.sh: packaging tools: $(cargo deb --version), $(cargo generate-rpm --version)"
