#!/usr/bin/env bash
# Event publishing and reading, embedded log vs NATS JetStream, in one run: EVENTS events of SIZE
# bytes of data with 1 and 16 producers, for fsync = always (group commit) and an interval;
# publishes per second, p50/p99 publish-acknowledgement latency, reads per second, and ratios.
#
#   bench/events.sh [EVENTS=1000000] [SIZE=256] [NATS_URL=nats://127.0.0.1:4222]
#
# With fsync = always a lone producer waits for one fsync per event, so that configuration runs
# EVENTS/50 events: the rate is what is compared. JetStream syncs on the server's own schedule
# (`sync_interval`, every 2 minutes by default; `always` needs nats-server 2.10+ configured so): the
# same acknowledgement, not the same durability, unless the server is configured for it.
set -euo pipefail
cd "$(dirname "$0")/.."

events="${1:-1000000}"
size="${2:-256}"
nats="${3:-${FLOTILLA_TEST_NATS_URL:-nats://127.0.0.1:4222}}"

echo "building the throughput harness (release)..." >&2
cargo build --release -q -p flotilla-events --example throughput
harness="$PWD/target/release/examples/throughput"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

nats_up=true
if ! (exec 3<>"/dev/tcp/127.0.0.1/${nats##*:}") 2>/dev/null; then
    echo "NATS is not reachable at $nats: JetStream columns are skipped" >&2
    nats_up=false
fi

declare -A rate
run() { # NAME BACKEND FSYNC PRODUCERS EVENTS
    local out
    out="$("$harness" "$2" "$3" "$4" "$5" "$size")"
    printf '%-28s %s\n' "$1" "$out"
    rate[$1]="$(sed -n 's/.*publish_per_s=\([0-9]*\).*/\1/p' <<<"$out")"
}

echo "$events events of $size bytes on $(nproc) cores"
for producers in 1 16; do
    n="$events"
    ((producers == 1)) && n=$((events / 50))
    run "embedded always p=$producers" "embedded:$work/always-$producers" always "$producers" "$n"
    run "embedded 100ms p=$producers" "embedded:$work/interval-$producers" 100ms "$producers" "$events"
    if $nats_up; then
        run "jetstream p=$producers" "nats:$nats" always "$producers" "$n"
    fi
done

python3 - "$nats_up" \
    "${rate[embedded always p=1]}" "${rate[embedded always p=16]}" \
    "${rate[embedded 100ms p=1]}" "${rate[embedded 100ms p=16]}" \
    "${rate[jetstream p=1]:-0}" "${rate[jetstream p=16]:-0}" <<'PY'
import sys
nats = sys.argv[1] == "true"
a1, a16, i1, i16, j1, j16 = map(float, sys.argv[2:])
print(f"group commit: fsync=always with 16 producers / 1 producer = {a16 / a1:.1f}x (goal >= 5x)")
if nats:
    print(f"embedded always / jetstream, 16 producers = {a16 / j16:.2f}x; 1 producer = {a1 / j1:.2f}x")
    print(f"embedded 100ms / jetstream, 16 producers = {i16 / j16:.2f}x; 1 producer = {i1 / j1:.2f}x")
PY
