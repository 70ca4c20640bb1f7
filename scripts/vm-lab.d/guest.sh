# shellcheck shell=bash
# Helpers inside a lab VM (sourced by every command the lab runs there, from the /lab share).
PGBIN=/usr/lib/postgresql/15/bin

# pool DISK MNT: an XFS with reflinks on a virtio disk (the pool the loop volumes live in).
pool() {
    mountpoint -q "$2" && return 0
    mkfs.xfs -q -f -m reflink=1 "$1"
    mkdir -p "$2"
    mount "$1" "$2"
}

# volume POOL NAME SIZE MNT: an ext4 on a loop device whose backing file is POOL/NAME.img
# (what the reflink provider snapshots), mounted at MNT.
volume() {
    local img=$1/$2.img dev
    truncate -s "$3" "$img"
    mkfs.ext4 -q -F "$img"
    dev=$(losetup --find --show "$img")
    mkdir -p "$4"
    mount "$dev" "$4"
}

# frozen MNT: exit 0 if MNT was frozen (and thaws it), 1 if it was not. Never blocks: FITHAW
# returns EINVAL on a filesystem that is not frozen.
frozen() {
    local err
    if err=$(fsfreeze -u "$1" 2>&1); then return 0; fi
    [[ $err == *"Invalid argument"* ]] && return 1
    echo "frozen: fsfreeze -u $1: $err" >&2
    return 2
}
# none_frozen MNT...: fails naming every mount that was still frozen (thawing it).
none_frozen() {
    local m bad=()
    for m in "$@"; do
        if frozen "$m"; then bad+=("$m"); fi
    done
    ((${#bad[@]} == 0)) || { echo "left frozen: ${bad[*]}" >&2; return 1; }
}

# pg_on DATAMNT WALMNT [PORT]: the image's small template cluster, data on DATAMNT/data and WAL on
# WALMNT/wal (pg_wal an absolute symlink), run by systemd as unit pg-PORT.
pg_on() {
    local port=${3:-5432}
    cp -a /opt/lab/pg15 "$1/data"
    mv "$1/data/pg_wal" "$2/wal"
    ln -s "$2/wal" "$1/data/pg_wal"
    chown -h postgres: "$1/data/pg_wal" "$1/data" "$2/wal"
    chmod 0700 "$1/data"
    pg_run "$1/data" "$port"
}
pg_run() { # DATADIR PORT
    mkdir -p /run/postgresql && chown postgres: /run/postgresql
    systemd-run -q --unit="pg-$2" -p User=postgres -p Type=notify -p TimeoutStartSec=300 \
        "$PGBIN/postgres" -D "$1" -p "$2"
}
sql() { # PORT SQL
    psql -X -q -v ON_ERROR_STOP=1 -h /run/postgresql -p "$1" -U postgres -d postgres -At -c "$2"
}

# agent_pids: the agent's main process, then the guardian (the other process of its cgroup).
agent_pids() {
    local main
    main=$(systemctl show -p MainPID --value quiesce-agent)
    echo "$main"
    grep -vx "$main" /sys/fs/cgroup/system.slice/quiesce-agent.service/cgroup.procs || true
}

# wait_for SECONDS CMD...: until CMD succeeds (every 0.1 s).
wait_for() {
    local n=$(($1 * 10))
    shift
    while ! "$@" 2>/dev/null; do
        n=$((n - 1))
        ((n > 0)) || { echo "wait_for: $* did not succeed" >&2; return 1; }
        sleep 0.1
    done
}
# held: the agent holds a freeze (its record under /run, a tmpfs: reading it never blocks).
held() { compgen -G '/run/quiesce-agent/freezes/*' >/dev/null; }

# writable_after MNT: milliseconds until a write + fsync on MNT completes (it blocks while MNT
# is frozen). Prints the figure.
writable_after() {
    local t0 t1
    t0=$(date +%s%3N)
    dd if=/dev/zero of="$1/.lab-probe" bs=4k count=1 conv=fsync status=none
    t1=$(date +%s%3N)
    rm -f "$1/.lab-probe"
    echo $((t1 - t0))
}

# The hold hook: while /run/lab-hold exists its `freeze` waits, so the other members of the
# set stay frozen; `freeze` is reached before this host's FIFREEZE.
hold_hook() {
    install -d -m 0755 /etc/quiesce/hooks.d
    cat >/etc/quiesce/hooks.d/10-hold <<'EOF'
#!/bin/sh
[ "$1" = freeze ] || exit 0
touch /run/lab-holding
while [ -e /run/lab-hold ]; do sleep 0.1; done
rm -f /run/lab-holding
EOF
    chmod 0755 /etc/quiesce/hooks.d/10-hold
}

# The application: seq tables on two shards; the writer (on the coordinator's VM) commits n on
# db1, then n on db2, then n+1 on db1, ...: at any one instant db1's max(n) - db2's is 0 or 1.
writer() { # HOST1 HOST2
    local n=0
    while true; do
        n=$((n + 1))
        psql -X -q -h "$1" -U postgres -d postgres -c "INSERT INTO seq VALUES ($n)" || return 1
        psql -X -q -h "$2" -U postgres -d postgres -c "INSERT INTO seq VALUES ($n)" || return 1
    done
}

# reach HOST: HOST answers on the lab network (a TCP connection to port 9 is refused or
# accepted within 3 s); fails on a timeout or no route. The image has no ping.
reach() {
    local out
    out=$(timeout 3 bash -c "exec 3<>/dev/tcp/$1/9" 2>&1) && return 0
    [[ $out == *"Connection refused"* ]]
}

# not CMD...: fails when CMD succeeds (unlike `! CMD`, which errexit ignores).
not() { if "$@"; then return 1; fi; }
# rows_at HOST MIN: table seq on HOST has more than MIN rows.
rows_at() { test "$(psql -X -At -h "$1" -U postgres -d postgres -c 'SELECT count(*) FROM seq')" -gt "$2"; }
