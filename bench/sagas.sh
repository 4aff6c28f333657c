#!/usr/bin/env bash
# Saga throughput: completed 3-step sagas per second against trivial services on loopback, with a
# durable commit for every transition, on the embedded SQLite store and on PostgreSQL, side by
# side; and what each saga costs the store: commits (SQLite: one fsync each) and writes.
#
#   bench/sagas.sh [SAGAS=20000] [CONCURRENCY=512] [POSTGRES_URL=$FLOTILLA_TEST_POSTGRES_URL]
#
# A 3-step saga writes 4 transitions (started with its first call; each outcome with the next
# call's start; the last with the final status). Concurrent sagas share commits: the store's one
# writer commits whatever transitions are waiting together, so commits per saga fall below 4 as
# concurrency grows. Goal: at least 1,000 sagas/s on SQLite.
set -euo pipefail
cd "$(dirname "$0")/.."

sagas="${1:-20000}"
concurrency="${2:-512}"
postgres="${3:-${FLOTILLA_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}}"

echo "building the throughput harness (release)..." >&2
cargo build --release -q -p flotilla-saga --example throughput
harness="$PWD/target/release/examples/throughput"

declare -A rate
run() { # NAME STORE CONCURRENCY [SAGAS]
    local out
    out="$("$harness" "$2" "${4:-$sagas}" "$3")"
    printf '%-22s %s\n' "$1" "$out"
    rate[$1]="$(sed -n 's/.*sagas_per_s=\([0-9]*\).*/\1/p' <<<"$out")"
}

echo "$sagas sagas of 3 steps on $(nproc) cores"
# One at a time waits for every commit: a fraction of the sagas is enough to measure it.
run "sqlite, 1 at a time" sqlite 1 $((sagas / 20))
run "sqlite, $concurrency at once" sqlite "$concurrency"
pg_host="${postgres#*@}"; pg_host="${pg_host%%/*}"; pg_port="${pg_host##*:}"
[[ "$pg_port" == "$pg_host" ]] && pg_port=5432
if (exec 3<>"/dev/tcp/127.0.0.1/$pg_port") 2>/dev/null; then
    run "postgres, $concurrency at once" "$postgres" "$concurrency"
    # The harness leaves its schema behind (saga_bench_<pid>): drop them.
    if command -v psql >/dev/null; then
        psql -q "$postgres" -Atc "SELECT 'DROP SCHEMA ' || nspname || ' CASCADE;' FROM pg_namespace WHERE nspname LIKE 'saga_bench_%'" \
            | psql -q "$postgres" >/dev/null || true
    fi
    awk -v s="${rate["sqlite, $concurrency at once"]}" -v p="${rate["postgres, $concurrency at once"]}" \
        'BEGIN { if (p > 0) printf "sqlite/postgres: %.2fx\n", s / p }'
else
    echo "PostgreSQL is not reachable on port $pg_port: its row is skipped" >&2
fi
