#!/usr/bin/env bash
# What telemetry costs the gateway, in one run: the same app twice, once with `[telemetry]
# enabled = false`, requests/s and p99 through each gateway with wrk.
#
#   bench/telemetry.sh [DURATION=10s] [CONNECTIONS=64]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

duration="${1:-10s}"
connections="${2:-64}"
need wrk nginx curl

echo "building flotilla (release)..." >&2
cargo build --release -q -p flotilla
flotilla="$PWD/target/release/flotilla"

work="$(mktemp -d)"
cleanup() {
    for app in on off; do "$flotilla" down "$work/$app" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT

declare -A gateway
for app in on off; do
    mkdir -p "$work/$app"
    gateway[$app]="$(free_port)"
    enabled=true
    [[ "$app" == off ]] && enabled=false
    cat > "$work/$app/flotilla.toml" <<TOML
app = "telemetry-$app"

[gateway]
listen = "127.0.0.1:${gateway[$app]}"

[[gateway.routes]]
prefix = "/"
service = "upstream"

[control]
listen = "127.0.0.1:$(free_port)"

[telemetry]
enabled = $enabled

$(upstream_service "$work/$app/upstream")
TOML
    "$flotilla" up "$work/$app" -d >/dev/null
    curl -fsS "http://127.0.0.1:${gateway[$app]}/" >/dev/null
done

echo "wrk -t$threads -c$connections -d$duration on $(nproc) cores, one fleet at a time"
measure telemetry_off "http://127.0.0.1:${gateway[off]}/" "$duration" "$connections"
measure telemetry_on "http://127.0.0.1:${gateway[on]}/" "$duration" "$connections"

python3 - "$rps_telemetry_on" "$rps_telemetry_off" <<'PY'
import sys
on, off = map(float, sys.argv[1:])
print(f"telemetry on / off = {on / off:.3f}x requests/s: {100 * (1 - on / off):.1f}% cost (target < 5%)")
PY
