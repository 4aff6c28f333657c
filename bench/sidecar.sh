#!/usr/bin/env bash
# The cost of a sidecar, side by side with nginx in one run:
#
#   hop latency at a fixed rate (default 1,000 req/s), p50 and p99 in microseconds:
#     direct     client → upstream
#     flotilla   client → `flotilla sidecar` → upstream
#     nginx      client → nginx reverse proxy (keep-alive upstream) → upstream
#   and the sidecar's resident memory when idle.
#
#   requests/s through a whole chain with wrk:
#     flotilla   wrk → Flotilla gateway → relay service → its Flotilla sidecar → upstream
#     nginx      wrk → nginx → relay service → nginx → upstream
#   where the relay is an nginx that forwards everything to its sidecar, as a service calling
#   another would, and the upstream is nginx answering a small static body.
#
#   bench/sidecar.sh [SECONDS=10] [RATE=1000] [CONNECTIONS=64]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-10}"
rate="${2:-1000}"
connections="${3:-64}"
source bench/lib.sh
need wrk nginx curl
nginx_bin="$(command -v nginx)"

echo "building flotilla and the latency probe (release)..." >&2
cargo build --release -q -p flotilla
cargo build --release -q -p flotilla-proxy --example hop_latency
flotilla="$PWD/target/release/flotilla"
probe="$PWD/target/release/examples/hop_latency"

work="$(mktemp -d)"
pids=()
cleanup() {
    "$flotilla" down "$work/app" >/dev/null 2>&1 || true
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pidfile in "$work"/*.pid; do [[ -f "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# nginx_conf NAME WORKERS DAEMON SERVERS: an nginx config with the shared boilerplate.
nginx_conf() {
    local name="$1" workers="$2" daemon="$3" servers="$4"
    mkdir -p "$work/$name"
    cat > "$work/$name/nginx.conf${5:-}" <<CONF
daemon $daemon;
worker_processes $workers;
pid $work/$name.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $work/$name; proxy_temp_path $work/$name;
    fastcgi_temp_path $work/$name; uwsgi_temp_path $work/$name; scgi_temp_path $work/$name;
$servers
}
CONF
}

# A keep-alive reverse proxy server block: listen on $1, forward to $2 with Host $3.
forward() {
    cat <<CONF
    upstream to_$1 { server $2; keepalive 128; }
    server {
        listen 127.0.0.1:$1;
        location / {
            proxy_pass http://to_$1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $3;
        }
    }
CONF
}

# Services run by Flotilla: the upstream, and the relay that calls it through its sidecar. Their
# configs are templates the run command fills in with the instance's port and sidecar address.
nginx_conf upstream 1 off '    server { listen 127.0.0.1:@PORT@; location / { default_type text/plain; return 200 "hello from upstream\n"; } }' .in
nginx_conf relay 1 off "$(forward @PORT@ @SIDECAR@ upstream)" .in
sed -i "s|pid $work/relay.pid|pid $work/relay/nginx.pid|; s|pid $work/upstream.pid|pid $work/upstream/nginx.pid|" \
    "$work/relay/nginx.conf.in" "$work/upstream/nginx.conf.in"

gateway_port="$(free_port)"
control_port="$(free_port)"
mkdir -p "$work/app"
cat > "$work/app/flotilla.toml" <<TOML
app = "bench"

[gateway]
listen = "127.0.0.1:$gateway_port"

[[gateway.routes]]
prefix = "/"
service = "relay"

[control]
listen = "127.0.0.1:$control_port"

[services.upstream]
run = "sh -c 'sed s/@PORT@/\$PORT/ $work/upstream/nginx.conf.in > $work/upstream/nginx.conf && exec $nginx_bin -p $work/upstream -c $work/upstream/nginx.conf'"
health = { path = "/", interval = "1s" }

[services.relay]
run = "sh -c 'sed -e s/@PORT@/\$PORT/ -e s/@SIDECAR@/\${HTTP_PROXY#http://}/ $work/relay/nginx.conf.in > $work/relay/nginx.conf && exec $nginx_bin -p $work/relay -c $work/relay/nginx.conf'"
health = { path = "/", interval = "1s" }
depends_on = ["upstream"]
TOML
"$flotilla" up "$work/app" -d >/dev/null
upstream_port="$(instance_port "$flotilla" "$work/app" upstream)"

# A standalone sidecar, as it runs outside `flotilla up`; its first line says where it listens.
"$flotilla" sidecar --service relay --instance relay-bench --control "http://127.0.0.1:$control_port" > "$work/sidecar.out" 2> "$work/sidecar.err" &
sidecar_pid=$!
pids+=("$sidecar_pid")
for _ in $(seq 50); do grep -q listening "$work/sidecar.out" 2>/dev/null && break; sleep 0.1; done
sidecar_addr="$(sed -n 's|.*listening on http://||p' "$work/sidecar.out" | head -1)"
[[ -n "$sidecar_addr" ]] || { echo "flotilla sidecar did not start:" >&2; cat "$work/sidecar.err" >&2; exit 1; }

# The nginx chain: an edge and a sidecar in one nginx, and a second relay pointing at them.
nginx_edge="$(free_port)"
nginx_sidecar="$(free_port)"
nginx_relay="$(free_port)"
nginx_conf nginx "$threads" on "$(forward "$nginx_edge" "127.0.0.1:$nginx_relay" relay; forward "$nginx_sidecar" "127.0.0.1:$upstream_port" upstream)"
nginx_conf nginx-relay 1 on "$(forward "$nginx_relay" "127.0.0.1:$nginx_sidecar" upstream)"
"$nginx_bin" -p "$work/nginx" -c "$work/nginx/nginx.conf"
"$nginx_bin" -p "$work/nginx-relay" -c "$work/nginx-relay/nginx.conf"

for url in "http://127.0.0.1:$upstream_port/" "http://$sidecar_addr/" "http://127.0.0.1:$nginx_sidecar/" \
    "http://127.0.0.1:$gateway_port/" "http://127.0.0.1:$nginx_edge/"; do
    curl -fsS -H 'Host: upstream' "$url" >/dev/null || { echo "not answering: $url" >&2; exit 1; }
done

sleep 2
rss_kib="$(awk '/^VmRSS/ {print $2}' "/proc/$sidecar_pid/status")"

echo "hop latency at $rate req/s for ${seconds}s (open loop, $(nproc) cores)"
hop() {
    local name="$1" url="$2" out
    out="$("$probe" "$url" --host upstream --rate "$rate" --seconds "$seconds")"
    printf '%-10s %s\n' "$name" "$out"
    eval "p50_$name=$(awk '{print $6}' <<<"$out")"
    eval "p99_$name=$(awk '{print $10}' <<<"$out")"
}
hop direct "http://127.0.0.1:$upstream_port/"
hop flotilla "http://$sidecar_addr/"
hop nginx "http://127.0.0.1:$nginx_sidecar/"

echo
echo "chain throughput: wrk -t$threads -c$connections -d${seconds}s"
measure flotilla "http://127.0.0.1:$gateway_port/" "${seconds}s" "$connections"
measure nginx "http://127.0.0.1:$nginx_edge/" "${seconds}s" "$connections"

echo
python3 - "$p50_direct" "$p99_direct" "$p50_flotilla" "$p99_flotilla" "$p50_nginx" "$p99_nginx" \
    "$rps_flotilla" "$rps_nginx" "$rss_kib" <<'PY'
import sys
d50, d99, f50, f99, n50, n99, frps, nrps, rss = map(float, sys.argv[1:])
print(f"sidecar hop adds  p50 {f50 - d50:6.0f} us (target < 100)   p99 {f99 - d99:6.0f} us (target < 1000)")
print(f"nginx hop adds    p50 {n50 - d50:6.0f} us                  p99 {n99 - d99:6.0f} us")
print(f"sidecar idle RSS  {rss / 1024:.1f} MiB (target < 10)")
print(f"chain flotilla / nginx = {frps / nrps:.2f}x requests/s")
PY
