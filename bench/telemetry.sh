#!/usr/bin/env bash
# What telemetry costs the gateway, in one run: the same app three times — `[telemetry]
# enabled = false`; spans in memory only (`storage = "memory"`); and the default (spans in memory
# and, sampled to `stored_spans_per_second`, in SQLite) — requests/s and p99 through each gateway
# with wrk.
#
#   bench/telemetry.sh [DURATION=10s] [CONNECTIONS=64] [ROUNDS=3]
#
# ACCESS_LOG=false turns the gateway's access log off in all three (it is on by default).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

duration="${1:-10s}"
connections="${2:-64}"
rounds="${3:-3}"
need wrk nginx curl

echo "building flotilla (release)..." >&2
cargo build --release -q -p flotilla
flotilla="$PWD/target/release/flotilla"

work="$(mktemp -d)"
cleanup() {
    for app in on memory off; do "$flotilla" down "$work/$app" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT

declare -A gateway
for app in on memory off; do
    mkdir -p "$work/$app"
    gateway[$app]="$(free_port)"
    enabled=true
    storage=sqlite
    [[ "$app" == off ]] && enabled=false
    [[ "$app" == memory ]] && storage=memory
    cat > "$work/$app/flotilla.toml" <<TOML
app = "telemetry-$app"

[gateway]
listen = "127.0.0.1:${gateway[$app]}"
access_log = ${ACCESS_LOG:-true}

[[gateway.routes]]
prefix = "/"
service = "upstream"

[control]
listen = "127.0.0.1:$(free_port)"

[telemetry]
enabled = $enabled
storage = "$storage"
otlp_listen = "127.0.0.1:$(free_port)"

$(upstream_service "$work/$app/upstream")
TOML
    "$flotilla" up "$work/$app" -d >/dev/null
    curl -fsS "http://127.0.0.1:${gateway[$app]}/" >/dev/null
done

echo "wrk -t$threads -c$connections -d$duration on $(nproc) cores, one fleet at a time"
# Interleaved rounds, medians compared: on two shared cores one run of each drifts by more than
# the cost being measured.
# CPU the flotilla process spent per request: far steadier than requests/s on shared cores, and
# what the cost is made of.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A runs cpu pid
for app in on memory off; do
    pid[$app]="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$work/$app/.flotilla/fleet.json")"
done
ticks_per_s="$(getconf CLK_TCK)"
for round in $(seq "$rounds"); do
    for app in off memory on; do
        before="$(cpu_ticks "${pid[$app]}")"
        measure "telemetry_$app" "http://127.0.0.1:${gateway[$app]}/" "$duration" "$connections"
        after="$(cpu_ticks "${pid[$app]}")"
        var="rps_telemetry_$app"
        runs[$app]+="${!var} "
        # µs of CPU per request, over the measured run and its 2 s warm-up at low load.
        secs="${duration%s}"
        cpu[$app]+="$(python3 -c "print(($after - $before) / $ticks_per_s * 1e6 / (${!var} * $secs))") "
    done
done
median() { python3 -c 'import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))' $1; }
rps_telemetry_off="$(median "${runs[off]}")"
rps_telemetry_memory="$(median "${runs[memory]}")"
rps_telemetry_on="$(median "${runs[on]}")"
echo "medians of $rounds rounds: off $rps_telemetry_off, memory $rps_telemetry_memory, on $rps_telemetry_on req/s"
cpu_off="$(median "${cpu[off]}")"; cpu_memory="$(median "${cpu[memory]}")"; cpu_on="$(median "${cpu[on]}")"
python3 - "$cpu_off" "$cpu_memory" "$cpu_on" <<'PY'
import sys
off, memory, on = map(float, sys.argv[1:])
print(f"flotilla CPU per request (median, includes warm-up): off {off:.1f} µs, memory {memory:.1f} µs (+{100 * (memory / off - 1):.1f}%), on {on:.1f} µs (+{100 * (on / off - 1):.1f}%)")
PY
control="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["control"])' "$work/on/.flotilla/fleet.json")"
stored="$(curl -fsS "$control/metrics" \
    | grep -E '^flotilla_telemetry_(stored_total\{signal="spans"\}|store_sampled_out_total|store_dropped_total)' || true)"

python3 - "$rps_telemetry_on" "$rps_telemetry_memory" "$rps_telemetry_off" <<'PY'
import sys
on, memory, off = map(float, sys.argv[1:])
print(f"spans in memory / off = {memory / off:.3f}x requests/s: {100 * (1 - memory / off):.1f}% cost")
print(f"telemetry on (memory + SQLite) / off = {on / off:.3f}x requests/s: {100 * (1 - on / off):.1f}% cost (target < 5%)")
PY
echo "$stored"
