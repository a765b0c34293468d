#!/usr/bin/env bash
# A throw-away MooseFS (Debian's moosefs-* 3.0.117) on loopback, for the
# benchmark: one master, 3 chunkservers (each with its own HDD directory),
# and an mfsmount, all with their own config, data, logs and pid files under
# one scratch directory. Nothing in /etc/mfs or /var/lib/mfs is used (but
# the package's empty-metadata template, copied) and no system service is
# touched. Run as root.
#
#   bash scripts/moosefs-local.sh start [DIR]   # prints the mount point
#   bash scripts/moosefs-local.sh stop  [DIR]   # unmount, stop, delete data
#   bash scripts/moosefs-local.sh status [DIR]
#
# DIR defaults to /var/tmp/jfs-bench-mfs; the mount point is DIR/mnt.
# MFS_PORT_BASE (default 19419) picks the ports: base..base+2 for the
# master (metalogger, chunkserver and client ports), base+3..base+5 for
# the chunkservers. New files get goal MFS_GOAL (default 1: one copy) and
# trash time 0.
# All daemons and the mount run at nice 0, as jfs's do (MooseFS's default
# is -19, ahead of everything else on the machine). Everything else is
# MooseFS's default, durability included: the master writes its changelog
# in the background (CHANGELOG_SAVE_MODE = 0) and chunkservers do not fsync
# chunk files on close (HDD_FSYNC_BEFORE_CLOSE = 0).
#
# Loopback only. MooseFS refuses loopback out of the box: a chunkserver
# whose MASTER_HOST resolves to 127.x refuses to connect ("localhost can't
# be used for connecting with master"), and the master drops a chunkserver
# whose address is 127.x ("you cannot use localhost for communication
# between chunkserver and master"). So:
#   * every daemon listens on 127.0.0.1 only (MATO*_LISTEN_HOST,
#     CSSERV_LISTEN_HOST) and chunkservers bind their master connection to
#     127.0.0.1 (BIND_HOST);
#   * chunkservers use MASTER_HOST = 0.0.0.0: not 127.x, so accepted, and
#     Linux routes a connect() to 0.0.0.0 to the local host over loopback;
#   * the master remaps the chunkservers' address 127.0.0.1 to 0.0.0.0
#     (REMAP_BITS = 32, REMAP_SOURCE_IP_CLASS = 127.0.0.1,
#     REMAP_DESTINATION_IP_CLASS = 0.0.0.0), which passes its 127.x check
#     and is what it hands to clients as chunk locations (0.0.0.0:port,
#     again loopback). `mfscli -SCS` lists them as 0.0.0.0:PORT.
# (In 3.0.117 the remap keys are REMAP_BITS, REMAP_SOURCE_IP_CLASS and
# REMAP_DESTINATION_IP_CLASS; see mfsmaster.cfg(5).)
set -euo pipefail

action=${1:-}
dir=${2:-/var/tmp/jfs-bench-mfs}
base=${MFS_PORT_BASE:-19419}
mnt=$dir/mnt
ncs=3

log() { echo "moosefs-local: $*" >&2; }
die() { log "$*"; exit 1; }

# Is pid $1 running? (A zombie is not: our daemons are reparented once this
# script exits, and their new parent may reap them late.)
alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    state=${state%% *}
    [[ -n $state && $state != Z && $state != X ]]
}

# Waits up to $2 seconds for pid $1 to exit; 0 if it did.
wait_gone() {
    local pid=$1 t=$(( $2 * 10 ))
    while alive "$pid" && ((t-- > 0)); do sleep 0.1; done
    ! alive "$pid"
}

# The pid in file $1, if that process is still alive and is the program $2.
live_pid() {
    local f=$1 comm=$2 pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]] || return 1
    echo "$pid"
}

stop() {
    [[ -d $dir ]] || return 0
    local pid i rc=0
    # 1. the client: unmounting ends mfsmount.
    if mountpoint -q "$mnt" 2>/dev/null || grep -q " $mnt fuse" /proc/mounts; then
        umount "$mnt" 2>/dev/null || { sleep 1; umount "$mnt" 2>/dev/null; } \
            || umount -l "$mnt" || { log "cannot unmount $mnt"; rc=1; }
    fi
    if pid=$(live_pid "$dir/run/mfsmount.pid" mfsmount); then
        wait_gone "$pid" 10 || { log "mfsmount $pid still running; killing it"; kill -9 "$pid" 2>/dev/null || true; }
    fi
    # 2. chunkservers (all at once), then the master: SIGTERM by pid (what
    # their own `-c CFG stop` sends, without its 1 s polling), SIGKILL if
    # one hangs; then `-c CFG stop`, which finds any other instance by the
    # lock file in its DATA_PATH (normally: "can't find process to terminate").
    local pids=()
    for ((i = 1; i <= ncs; i++)); do
        if pid=$(live_pid "$dir/run/cs$i.pid" mfschunkserver); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for pid in "${pids[@]}"; do
        wait_gone "$pid" 30 || { log "chunkserver $pid still running; killing it"; kill -9 "$pid" 2>/dev/null || true; }
    done
    for ((i = 1; i <= ncs; i++)); do
        [[ -f $dir/cs$i/mfschunkserver.cfg ]] && mfschunkserver -c "$dir/cs$i/mfschunkserver.cfg" stop >/dev/null 2>&1 || true
    done
    if pid=$(live_pid "$dir/run/master.pid" mfsmaster); then
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid" 60 || { log "master $pid still running; killing it"; kill -9 "$pid" 2>/dev/null || true; }
    fi
    [[ -f $dir/master/mfsmaster.cfg ]] && mfsmaster -c "$dir/master/mfsmaster.cfg" stop >/dev/null 2>&1 || true
    # The daemons were reparented when the start script exited; give their
    # new parent (init) a moment to reap them, so that they are gone from the
    # process list when this returns.
    local f t=50
    for f in "$dir"/run/*.pid; do
        [[ -s $f ]] || continue
        pid=$(<"$f")
        while [[ -e /proc/$pid ]] && ! alive "$pid" && ((t-- > 0)); do sleep 0.1; done
    done
    # 3. the data (chunks, metadata); configs and logs stay for a post-mortem.
    rm -rf --one-file-system "$dir/master/data" "$dir"/cs*/data "$dir"/cs*/hdd "$dir/run"
    rmdir "$mnt" 2>/dev/null || true
    return $rc
}

status() {
    local name pid
    for name in master cs1 cs2 cs3 mfsmount; do
        local comm=mfschunkserver
        [[ $name == master ]] && comm=mfsmaster
        [[ $name == mfsmount ]] && comm=mfsmount
        if pid=$(live_pid "$dir/run/$name.pid" "$comm"); then
            echo "$name: running, pid $pid"
        else
            echo "$name: not running"
        fi
    done
    mountpoint -q "$mnt" 2>/dev/null && echo "mounted on $mnt" || echo "not mounted"
    command -v mfscli >/dev/null && mfscli -H 127.0.0.1 -P $((base + 2)) -SCS -p 2>/dev/null || true
}

# Starts "$@" in its own session (so a Ctrl-C of the benchmark reaches only
# the benchmark, whose trap then stops this cleanly), in the foreground mode
# of the MooseFS daemons (-f: logs go to stderr, here LOG), and records its pid.
spawn() {
    local name=$1 logf=$2
    shift 2
    setsid "$@" </dev/null >"$logf" 2>&1 &
    echo $! >"$dir/run/$name.pid"
}

start() {
    [[ $EUID -eq 0 ]] || die "must run as root"
    local prog
    for prog in mfsmaster mfschunkserver mfsmount; do
        command -v "$prog" >/dev/null || die "$prog not found (apt-get install moosefs-master moosefs-chunkserver moosefs-client)"
    done
    [[ -f /var/lib/mfs/metadata.mfs.empty ]] || die "/var/lib/mfs/metadata.mfs.empty missing (moosefs-master package)"

    # A leftover instance from this directory (an interrupted run) goes first.
    stop || true
    local port
    for ((port = base; port < base + 3 + ncs; port++)); do
        if ss -Htln "sport = :$port" | grep -q .; then
            die "port $port is in use; pick other ports with MFS_PORT_BASE"
        fi
    done
    if grep -q " $mnt " /proc/mounts; then
        die "$mnt is still mounted; unmount it first"
    fi
    rm -rf --one-file-system "$dir"
    mkdir -p "$dir/master/data" "$dir/run" "$dir/log" "$mnt"

    # Master: every listener on 127.0.0.1; chunkservers' 127.0.0.1 remapped
    # to 0.0.0.0 (see the header). Root working user so that everything can
    # live under DIR without chowning; NICE_LEVEL 0 (see the header).
    cat >"$dir/master/mfsmaster.cfg" <<EOF
WORKING_USER = root
WORKING_GROUP = root
SYSLOG_IDENT = jfsbench-mfsmaster
NICE_LEVEL = 0
DATA_PATH = $dir/master/data
EXPORTS_FILENAME = $dir/master/mfsexports.cfg
TOPOLOGY_FILENAME = $dir/master/mfstopology.cfg
MATOML_LISTEN_HOST = 127.0.0.1
MATOML_LISTEN_PORT = $base
MATOCS_LISTEN_HOST = 127.0.0.1
MATOCS_LISTEN_PORT = $((base + 1))
MATOCL_LISTEN_HOST = 127.0.0.1
MATOCL_LISTEN_PORT = $((base + 2))
REMAP_BITS = 32
REMAP_SOURCE_IP_CLASS = 127.0.0.1
REMAP_DESTINATION_IP_CLASS = 0.0.0.0
EOF
    # Clients from loopback only; root stays root (the benchmark runs as root).
    echo "127.0.0.0/8 / rw,alldirs,admin,maproot=0:0" >"$dir/master/mfsexports.cfg"
    : >"$dir/master/mfstopology.cfg"
    cp /var/lib/mfs/metadata.mfs.empty "$dir/master/data/metadata.mfs"
    spawn master "$dir/log/master.log" mfsmaster -f -c "$dir/master/mfsmaster.cfg" start

    local i
    for ((i = 1; i <= ncs; i++)); do
        mkdir -p "$dir/cs$i/data" "$dir/cs$i/hdd"
        cat >"$dir/cs$i/mfschunkserver.cfg" <<EOF
WORKING_USER = root
WORKING_GROUP = root
SYSLOG_IDENT = jfsbench-mfscs$i
NICE_LEVEL = 0
DATA_PATH = $dir/cs$i/data
HDD_CONF_FILENAME = $dir/cs$i/mfshdd.cfg
MASTER_HOST = 0.0.0.0
MASTER_PORT = $((base + 1))
BIND_HOST = 127.0.0.1
CSSERV_LISTEN_HOST = 127.0.0.1
CSSERV_LISTEN_PORT = $((base + 2 + i))
EOF
        echo "$dir/cs$i/hdd" >"$dir/cs$i/mfshdd.cfg"
    done

    # The master must listen before the chunkservers connect.
    local t=100
    until ss -Htln "sport = :$((base + 2))" | grep -q .; do
        ((t-- > 0)) && alive "$(<"$dir/run/master.pid")" \
            || { cat "$dir/log/master.log" >&2; die "mfsmaster did not start (log above)"; }
        sleep 0.1
    done
    for ((i = 1; i <= ncs; i++)); do
        spawn "cs$i" "$dir/log/cs$i.log" mfschunkserver -f -c "$dir/cs$i/mfschunkserver.cfg" start
    done

    # All chunkservers registered? `mfscli -SCS` lists them (as 0.0.0.0:PORT).
    if command -v mfscli >/dev/null; then
        t=300
        until [[ $(mfscli -H 127.0.0.1 -P $((base + 2)) -SCS -p 2>/dev/null | grep -c '^chunk servers:') -ge $ncs ]]; do
            if ((t-- <= 0)); then
                tail -n 20 "$dir"/log/*.log >&2
                die "only $(mfscli -H 127.0.0.1 -P $((base + 2)) -SCS -p 2>/dev/null | grep -c '^chunk servers:') of $ncs chunkservers registered after 30 s (logs above)"
            fi
            sleep 0.1
        done
    fi

    # The client, also in the foreground (-f) under our pid file.
    spawn mfsmount "$dir/log/mfsmount.log" mfsmount -f -H 127.0.0.1 -P $((base + 2)) -o mfsnice=0 "$mnt"
    t=100
    until mountpoint -q "$mnt"; do
        if ((t-- <= 0)) || ! alive "$(<"$dir/run/mfsmount.pid")"; then
            cat "$dir/log/mfsmount.log" >&2
            die "mfsmount did not mount $mnt (log above)"
        fi
        sleep 0.1
    done
    # MFS_GOAL copies of each chunk (default 1) and no trash, so deleted
    # benchmark files free their chunks at once.
    mfssetgoal -r "${MFS_GOAL:-1}" "$mnt" >/dev/null
    mfssettrashtime -r 0 "$mnt" >/dev/null

    # Data really flows: a file of 3 chunks (64 MiB each) round-trips and
    # has a valid copy on a chunkserver.
    local probe=$mnt/.probe
    head -c $((130 << 20)) /dev/urandom >"$dir/probe.src"
    cp "$dir/probe.src" "$probe"
    sync
    if ! cmp -s "$dir/probe.src" "$probe"; then
        die "MooseFS probe file read back different (logs in $dir/log)"
    fi
    if ! mfsfileinfo "$probe" | grep -q 'status:VALID'; then
        mfsfileinfo "$probe" >&2 || true
        die "MooseFS probe file has no valid chunk copy (logs in $dir/log)"
    fi
    log "$(mfsfileinfo "$probe" | grep -o 'copy 1: [0-9.:]*' | sort -u | tr '\n' ' ')"
    rm -f "$probe" "$dir/probe.src"
    log "master 127.0.0.1:$((base + 2)), $ncs chunkservers registered, mounted on $mnt (goal ${MFS_GOAL:-1})"
    echo "$mnt"
}

case "$action" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    -h|--help) sed -n '2,13p' "$0" ;;
    *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
