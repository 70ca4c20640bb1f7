# shellcheck shell=bash
# PostgreSQL helpers shared by scripts/demo and root test scripts.
#
# Source it from a bash script running as root:   . "$repo/scripts/lib/pg.sh"
# Every server is reached over TCP on 127.0.0.1 as user postgres with trust
# authentication (initdb -A trust); nothing here listens on another address.
#
# Functions return non-zero on failure and never exit the caller themselves.

PG_VERSION=${PG_VERSION:-15}
PGBIN=${PGBIN:-/usr/lib/postgresql/$PG_VERSION/bin}
PG_USER=${PG_USER:-postgres}
PG_DB=${PG_DB:-demo}

# pg_as CMD ARGS... : run a command as the postgres user, from / so that a
# root-only working directory does not get in the way.
pg_as() {
    (cd / && runuser -u "$PG_USER" -- "$@")
}

# pg_initdb DATADIR WALDIR LOG : a new cluster with data checksums, its WAL
# directory elsewhere (initdb makes DATADIR/pg_wal an absolute symlink to it).
# The parents of both must already be writable by postgres.
pg_initdb() {
    local datadir=$1 waldir=$2 log=$3
    pg_as "$PGBIN/initdb" -D "$datadir" --waldir "$waldir" -A trust -U "$PG_USER" \
        --data-checksums -E UTF8 --locale=C >"$log" 2>&1
}

# pg_tune_small DATADIR : settings for a demo on small volumes. max_wal_size is
# kept well below a 512 MiB WAL volume so that pg_wal can never fill it.
pg_tune_small() {
    local datadir=$1
    cat >>"$datadir/postgresql.conf" <<'EOF'

# --- added by quiesce scripts/lib/pg.sh ---
listen_addresses = '127.0.0.1'
max_wal_size = 256MB
min_wal_size = 64MB
shared_buffers = 64MB
max_connections = 30
log_checkpoints = on
# crash recovery of a restored copy starts by syncing the data directory: one
# syncfs instead of an fsync per file (5 s -> well under 1 s on a loop volume)
recovery_init_sync_method = syncfs
log_line_prefix = '%m [%p] '
EOF
    # PostgreSQL never fsyncs its config; without this a crash image taken within
    # seconds (ext4 commits metadata before delayed data) ends the file in NULs.
    sync "$datadir/postgresql.conf"
}

# pg_start DATADIR PORT SOCKDIR LOG : start a server and wait until it accepts
# connections, which for a copy of a crashed server means crash recovery is done.
pg_start() {
    local datadir=$1 port=$2 sockdir=$3 log=$4
    if [[ ! -e $log ]]; then
        install -o "$PG_USER" -m 0640 /dev/null "$log"
    fi
    pg_as "$PGBIN/pg_ctl" start -w -t "${PG_START_TIMEOUT:-300}" -D "$datadir" -l "$log" \
        -o "-p $port -k $sockdir -c listen_addresses=127.0.0.1" >/dev/null
}

# pg_stop DATADIR [MODE] : stop a server if one runs there (default mode immediate).
# Quiet and successful when none runs.
pg_stop() {
    local datadir=$1 mode=${2:-immediate}
    [[ -f $datadir/postmaster.pid ]] || return 0
    pg_as "$PGBIN/pg_ctl" stop -w -t 60 -D "$datadir" -m "$mode" >/dev/null 2>&1
}

# pg_sql PORT DB SQL : run SQL, print the unaligned tuples-only result.
pg_sql() {
    local port=$1 db=$2 sql=$3
    "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U "$PG_USER" -d "$db" \
        -At -c "$sql"
}

# pg_xmax PORT DB : the next transaction id, without assigning one. It grows with
# every committed (or aborted) write transaction, so it shows a workload progresses.
pg_xmax() {
    pg_sql "$1" "$2" "SELECT pg_snapshot_xmax(pg_current_snapshot())"
}

# pg_seed_accounts PORT DB ROWS BALANCE : database DB with table accounts, and amcheck.
pg_seed_accounts() {
    local port=$1 db=$2 rows=$3 balance=$4
    pg_sql "$port" postgres "CREATE DATABASE $db" >/dev/null
    pg_sql "$port" "$db" "
        CREATE EXTENSION IF NOT EXISTS amcheck;
        CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
        INSERT INTO accounts SELECT g, $balance FROM generate_series(1, $rows) g;
        ANALYZE accounts;" >/dev/null
}

# pg_write_transfer_script FILE ROWS : a pgbench script that moves a random amount
# (possibly negative) between two random accounts in one transaction, so
# sum(balance) never changes. Rows are locked in id order: no deadlocks.
pg_write_transfer_script() {
    local file=$1 rows=$2
    cat >"$file" <<EOF
\\set a random(1, $rows)
\\set b random(1, $rows)
\\set lo least(:a, :b)
\\set hi greatest(:a, :b)
\\set amount random(-100, 100)
BEGIN;
UPDATE accounts SET balance = balance - :amount WHERE id = :lo;
UPDATE accounts SET balance = balance + :amount WHERE id = :hi;
COMMIT;
EOF
}

# pg_fix_restored_copy DATADIR WALDIR : make a copy of a running server's
# volumes startable as a second instance: drop the copied postmaster.pid and
# point the absolute pg_wal symlink at the copy's WAL instead of the original's.
pg_fix_restored_copy() {
    local datadir=$1 waldir=$2
    rm -f "$datadir/postmaster.pid"
    [[ -L $datadir/pg_wal ]] || { echo "pg_fix_restored_copy: $datadir/pg_wal is not a symlink" >&2; return 1; }
    [[ -d $waldir ]] || { echo "pg_fix_restored_copy: no WAL directory $waldir" >&2; return 1; }
    ln -sfn "$waldir" "$datadir/pg_wal"
    chown -h "$PG_USER:$PG_USER" "$datadir/pg_wal"
}

# pg_amcheck_db PORT DB LOG : heap and all-index check of one database.
pg_amcheck_db() {
    local port=$1 db=$2 log=$3
    "$PGBIN/pg_amcheck" -h 127.0.0.1 -p "$port" -U "$PG_USER" -d "$db" \
        --heapallindexed >"$log" 2>&1
}

# pg_checksums_check DATADIR LOG : verify data checksums of a stopped cluster.
pg_checksums_check() {
    local datadir=$1 log=$2
    pg_as "$PGBIN/pg_checksums" --check -D "$datadir" >"$log" 2>&1
}
