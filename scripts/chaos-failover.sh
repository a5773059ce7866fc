#!/usr/bin/env bash
# A PostgreSQL failover under load: scripts/chaos-failover.sh
#
# Builds a primary and a synchronous streaming standby (pg_basebackup) from the PostgreSQL 15
# binaries in private data directories under a temporary directory, on ports of their own (never
# the system cluster), puts haproxy in front (the primary, the standby as its backup), and runs
# two jobwire-server replicas (release build) through haproxy. The failover_drill example then
# enqueues without pause through both replicas, recording every id whose enqueue returned OK,
# while a worker on each replica drains. Mid-drain the script SIGKILLs the primary and promotes
# the standby; haproxy's health check fails over to it and the servers reconnect.
#
# At the end every acknowledged enqueue must be in the promoted database and SUCCEEDED. Prints
# the counts (lost must be 0) and the outage the producers saw, and exits non-zero otherwise.
#
# Environment: DRILL_SECONDS (producing time, default 30), KILL_AFTER (seconds of producing
# before the kill, default 10), BASE_PORT (default 56400: primary, standby, haproxy, servers
# follow it), PG_BIN (default /usr/lib/postgresql/15/bin), KEEP=1 keeps the directory.
# As root, PostgreSQL runs as the user postgres. Installs haproxy with apt-get when missing.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
DRILL_SECONDS=${DRILL_SECONDS:-30}
KILL_AFTER=${KILL_AFTER:-10}
BASE_PORT=${BASE_PORT:-56400}
primary_port=$BASE_PORT
standby_port=$((BASE_PORT + 1))
proxy_port=$((BASE_PORT + 2))
server_ports=($((BASE_PORT + 3)) $((BASE_PORT + 4)))

say() { printf '[%s] %s\n' "$(date +%T.%3N)" "$*"; }
die() {
    say "FAILED: $*" >&2
    exit 1
}

command -v haproxy >/dev/null || {
    say "installing haproxy"
    [[ $(id -u) -eq 0 ]] || die "haproxy is missing: install it (apt-get install haproxy)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; } \
        </dev/null >/dev/null || die "apt-get install haproxy failed"
}
[[ -x $PG_BIN/initdb ]] || die "no PostgreSQL binaries in $PG_BIN (PG_BIN)"

work=$(mktemp -d /tmp/jobwire-failover.XXXXXX)
chmod 755 "$work"
as_pg=()
if [[ $(id -u) -eq 0 ]]; then
    chown postgres: "$work"
    as_pg=(runuser -u postgres --)
fi
pg() { "${as_pg[@]}" "$@"; }

pids=()
cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for dir in "$work/primary" "$work/standby"; do
        [[ -f $dir/postmaster.pid ]] && pg "$PG_BIN/pg_ctl" -D "$dir" -m immediate stop >/dev/null 2>&1 || true
    done
    wait 2>/dev/null || true
    if [[ ${KEEP:-0} == 1 || $status -ne 0 ]]; then
        say "logs kept in $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

say "building jobwire-server and the failover_drill example (release)"
# Two commands: `--example` would narrow the first package's targets to the example too.
cargo build --release -q -p jobwire-server --bins
cargo build --release -q -p jobwire --example failover_drill
server_bin=$repo/target/release/jobwire-server
drill_bin=$repo/target/release/examples/failover_drill

psql_at() {
    local port=$1
    shift
    "$PG_BIN/psql" -X -q -t -A -h 127.0.0.1 -p "$port" -U postgres "$@"
}

say "primary on $primary_port: initdb"
pg "$PG_BIN/initdb" -D "$work/primary" -U postgres --auth=trust >"$work/initdb.log"
cat >>"$work/primary/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $primary_port
unix_socket_directories = '$work'
wal_level = replica
max_wal_senders = 4
# A commit returns only once the standby has written it to disk.
synchronous_standby_names = 'standby1'
synchronous_commit = on
max_connections = 200
EOF
echo "host replication postgres 127.0.0.1/32 trust" >>"$work/primary/pg_hba.conf"
pg "$PG_BIN/pg_ctl" -D "$work/primary" -l "$work/primary.log" -w start >/dev/null

say "standby on $standby_port: pg_basebackup"
pg "$PG_BIN/pg_basebackup" -D "$work/standby" -R -X stream \
    -d "host=127.0.0.1 port=$primary_port user=postgres application_name=standby1"
# Promoted, it runs alone: a synchronous_standby_names copied from the primary would make
# every commit wait for a standby that is gone.
cat >>"$work/standby/postgresql.conf" <<EOF
port = $standby_port
synchronous_standby_names = ''
EOF
pg "$PG_BIN/pg_ctl" -D "$work/standby" -l "$work/standby.log" -w start >/dev/null
for _ in $(seq 100); do
    [[ $(psql_at "$primary_port" -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'") == sync ]] && break
    sleep 0.1
done
[[ $(psql_at "$primary_port" -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'") == sync ]] ||
    die "the standby did not become synchronous"
say "standby streaming, synchronous"

# The standby serves only when the primary is down (backup); a connection to a server marked
# down is cut at once, so the servers reconnect (to the promoted standby) rather than wait.
cat >"$work/haproxy.cfg" <<EOF
global
    maxconn 2000
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
listen postgres
    bind 127.0.0.1:$proxy_port
    option pgsql-check user postgres
    default-server inter 300ms fall 2 rise 2 on-marked-down shutdown-sessions
    server primary 127.0.0.1:$primary_port check
    server standby 127.0.0.1:$standby_port check backup
EOF
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do
    psql_at "$proxy_port" -d postgres -c "SELECT 1" >/dev/null 2>&1 && break
    sleep 0.1
done
psql_at "$proxy_port" -d postgres -c "CREATE DATABASE jobwire" >/dev/null
database_url="postgres://postgres@127.0.0.1:$proxy_port/jobwire"
say "haproxy on $proxy_port"

urls=()
for i in 0 1; do
    port=${server_ports[$i]}
    DATABASE_URL=$database_url RUST_LOG=${RUST_LOG:-info} \
        "$server_bin" --listen "127.0.0.1:$port" --leader-ttl 2s \
        >"$work/server$i.out" 2>"$work/server$i.log" &
    pids+=($!)
    urls+=("http://127.0.0.1:$port")
done
for i in 0 1; do
    for _ in $(seq 300); do
        grep -q "listening on" "$work/server$i.out" && break
        sleep 0.1
    done
    grep -q "listening on" "$work/server$i.out" || die "server $i did not start (see $work/server$i.log)"
done
say "two jobwire-server replicas: ${urls[*]}"

acked=$work/acked.txt
JOBWIRE_URLS=$(
    IFS=,
    echo "${urls[*]}"
) DRILL_ACKED=$acked DRILL_SECONDS=$DRILL_SECONDS RUST_LOG=warn \
    "$drill_bin" >"$work/drill.out" 2>"$work/drill.log" &
drill=$!
pids+=("$drill")
say "producing for ${DRILL_SECONDS}s; killing the primary after ${KILL_AFTER}s"

sleep "$KILL_AFTER"
before=$(wc -l <"$acked")
primary_pid=$(head -n 1 "$work/primary/postmaster.pid")
kill -KILL "$primary_pid"
killed_at=$(date +%s.%N)
say "SIGKILLed the primary (pid $primary_pid) after $before acknowledged enqueues"
pg "$PG_BIN/pg_ctl" -D "$work/standby" -w promote >/dev/null
say "promoted the standby"

for _ in $(seq $((DRILL_SECONDS * 10 + 600))); do
    [[ -s $work/drill.out ]] && break
    sleep 0.1
done
[[ -s $work/drill.out ]] || die "the drill printed no summary (see $work/drill.log)"
summary=$(cat "$work/drill.out")
say "producers done: $summary"

# Every acknowledged id, checked against the promoted database (directly, not through haproxy).
psql_at "$standby_port" -d jobwire -c "CREATE TABLE drill_acked (id uuid PRIMARY KEY)"
psql_at "$standby_port" -d jobwire -c "\\copy drill_acked FROM '$acked'"
count_sql="SELECT count(*), count(j.id), count(*) FILTER (WHERE j.state = 'succeeded')
           FROM drill_acked a LEFT JOIN jobs j ON j.id = a.id"
for _ in $(seq 1200); do
    IFS='|' read -r total present succeeded <<<"$(psql_at "$standby_port" -d jobwire -c "$count_sql")"
    [[ $succeeded == "$total" ]] && break
    sleep 0.1
done
IFS='|' read -r total present succeeded <<<"$(psql_at "$standby_port" -d jobwire -c "$count_sql")"
lost=$((total - present))
unfinished=$((present - succeeded))
states=$(psql_at "$standby_port" -d jobwire -c "SELECT string_agg(state || '=' || n, ' ') FROM (SELECT j.state::text, count(*) n FROM drill_acked a JOIN jobs j ON j.id = a.id GROUP BY 1 ORDER BY 1) s")
all_jobs=$(psql_at "$standby_port" -d jobwire -c "SELECT count(*) FROM jobs")
kill -TERM "$drill" 2>/dev/null || true

outage_ms=$(sed -n 's/.*"outage_ms":\([0-9null]*\).*/\1/p' <<<"$summary")
failed=$(sed -n 's/.*"failed_enqueues":\([0-9]*\).*/\1/p' <<<"$summary")
echo
echo "=== failover drill: $(date -u +%FT%TZ), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), 2 replicas through haproxy"
echo "acknowledged enqueues:   $total ($before before the kill)"
echo "in the promoted database: $present; SUCCEEDED: $succeeded ($states); jobs in all: $all_jobs"
echo "lost:                    $lost"
echo "not SUCCEEDED:           $unfinished"
echo "failed enqueues:         $failed (answered with an error: never acknowledged)"
echo "outage seen by clients:  ${outage_ms} ms (first failed enqueue to the first acknowledged one sent after it)"
for i in 0 1; do
    echo "server $i: $(grep -c 'WARN\|ERROR' "$work/server$i.log") warnings and errors logged; leadership: $(grep -o 'leadership [a-z]*' "$work/server$i.log" | sort | uniq -c | tr -s ' ' | paste -sd, -)"
done
: "$killed_at"
[[ $lost -eq 0 && $unfinished -eq 0 && $total -gt 0 ]] || die "acknowledged jobs were lost or did not finish"
echo "OK: nothing acknowledged was lost"
