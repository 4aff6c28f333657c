#!/usr/bin/env bash
# Gateway throughput and latency, side by side in one run:
#   direct      wrk → upstream
#   flotilla    wrk → Flotilla gateway → upstream
#   nginx       wrk → nginx reverse proxy (keep-alive upstream) → upstream
# The upstream is nginx answering a small static body, run by Flotilla as a service so the gateway
# sees it through its registry like any other. Prints requests/s, p50, p99 and the two ratios.
#
#   bench/gateway.sh [DURATION=10s] [CONNECTIONS=64]
set -euo pipefail
cd "$(dirname "$0")/.."

source bench/lib.sh

duration="${1:-10s}"
connections="${2:-64}"
need wrk nginx curl
nginx_bin="$(command -v nginx)"

echo "building flotilla (release)..." >&2
cargo build --release -q -p flotilla
flotilla="$PWD/target/release/flotilla"

work="$(mktemp -d)"
cleanup() {
    "$flotilla" down "$work/app" >/dev/null 2>&1 || true
    [[ -f "$work/proxy.pid" ]] && kill "$(cat "$work/proxy.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/app" "$work/proxy"
gateway_port="$(free_port)"
control_port="$(free_port)"
cat > "$work/app/flotilla.toml" <<TOML
app = "bench"

[gateway]
listen = "127.0.0.1:$gateway_port"

[[gateway.routes]]
prefix = "/"
service = "upstream"

[control]
listen = "127.0.0.1:$control_port"

$(upstream_service "$work/upstream")
TOML
"$flotilla" up "$work/app" -d >/dev/null
upstream_port="$(instance_port "$flotilla" "$work/app" upstream)"

proxy_port="$(free_port)"
cat > "$work/proxy/nginx.conf" <<CONF
daemon on;
worker_processes $threads;
pid $work/proxy.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $work/proxy; proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/proxy; uwsgi_temp_path $work/proxy; scgi_temp_path $work/proxy;
    upstream backend { server 127.0.0.1:$upstream_port; keepalive 128; }
    server {
        listen 127.0.0.1:$proxy_port;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
CONF
"$nginx_bin" -p "$work/proxy" -c "$work/proxy/nginx.conf"

for url in "http://127.0.0.1:$upstream_port/" "http://127.0.0.1:$gateway_port/" "http://127.0.0.1:$proxy_port/"; do
    curl -fsS "$url" >/dev/null || { echo "not answering: $url" >&2; exit 1; }
done

echo "wrk -t$threads -c$connections -d$duration on $(nproc) cores"
measure direct "http://127.0.0.1:$upstream_port/" "$duration" "$connections"
measure flotilla "http://127.0.0.1:$gateway_port/" "$duration" "$connections"
measure nginx "http://127.0.0.1:$proxy_port/" "$duration" "$connections"

python3 - "$rps_direct" "$rps_flotilla" "$rps_nginx" <<'PY'
import sys
direct, flotilla, nginx = map(float, sys.argv[1:])
print(f"flotilla / nginx  = {flotilla / nginx:.2f}x requests/s (target >= 0.80x)")
print(f"flotilla / direct = {flotilla / direct:.2f}x requests/s")
PY
