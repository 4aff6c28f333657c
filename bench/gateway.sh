#!/usr/bin/env bash
# The gateway against nginx and HAProxy as the same reverse proxy, in one run:
#   direct        wrk → upstream
#   flotilla      wrk → Flotilla gateway → upstream
#   flotilla_jwt  wrk → Flotilla gateway, validating an RS256 JWT (JWKS file) → upstream
#   nginx         wrk → nginx (keep-alive upstream pool) → upstream
#   haproxy       wrk → HAProxy (connection reuse) → upstream
# The upstream is nginx answering a small static body, run by Flotilla as a service so the gateway
# sees it through its registry like any other. Every proxy adds X-Forwarded-For and writes no
# access log (nginx and HAProxy as configured here; Flotilla with `access_log = false`).
# Rounds are interleaved and medians compared: on two shared cores one run drifts by more than the
# differences measured. Prints requests/s, p50 and p99 per round, then the ratios.
#
#   bench/gateway.sh [DURATION=10s] [CONNECTIONS=64] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."

source bench/lib.sh

duration="${1:-10s}"
connections="${2:-64}"
rounds="${3:-3}"
need wrk nginx haproxy curl openssl
nginx_bin="$(command -v nginx)"
haproxy_bin="$(command -v haproxy)"

echo "building flotilla (release)..." >&2
cargo build --release -q -p flotilla
flotilla="$PWD/target/release/flotilla"

work="$(mktemp -d)"
cleanup() {
    "$flotilla" down "$work/app" >/dev/null 2>&1 || true
    [[ -f "$work/proxy.pid" ]] && kill "$(cat "$work/proxy.pid")" 2>/dev/null || true
    [[ -f "$work/haproxy.pid" ]] && kill "$(cat "$work/haproxy.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/app" "$work/proxy"

# An RS256 key, its JWKS and a token valid for a day.
openssl genrsa -out "$work/jwt.pem" 2048 2>/dev/null
python3 - "$work" <<'PY'
import base64, json, subprocess, sys, time
work = sys.argv[1]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
modulus = subprocess.run(["openssl", "rsa", "-in", f"{work}/jwt.pem", "-noout", "-modulus"],
                         capture_output=True, text=True, check=True).stdout.split("=", 1)[1].strip()
n = bytes.fromhex(modulus)
json.dump({"keys": [{"kty": "RSA", "kid": "bench", "alg": "RS256", "use": "sig",
                     "n": b64(n), "e": b64((65537).to_bytes(3, "big"))}]},
          open(f"{work}/app/jwks.json", "w"))
header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "bench"}).encode())
claims = b64(json.dumps({"sub": "bench", "iss": "bench", "aud": "bench",
                         "exp": int(time.time()) + 86400, "scope": "read"}).encode())
signing_input = f"{header}.{claims}".encode()
signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", f"{work}/jwt.pem"],
                           input=signing_input, capture_output=True, check=True).stdout
open(f"{work}/token", "w").write(f"{header}.{claims}.{b64(signature)}")
PY
token="$(cat "$work/token")"

gateway_port="$(free_port)"
control_port="$(free_port)"
cat > "$work/app/flotilla.toml" <<TOML
app = "bench"

[gateway]
listen = "127.0.0.1:$gateway_port"
access_log = false

[gateway.auth.bench]
jwks = "jwks.json"
issuer = "bench"
audience = "bench"
algorithms = ["RS256"]

[[gateway.routes]]
prefix = "/jwt"
service = "upstream"
rewrite = "/"
auth = "bench"

[[gateway.routes]]
prefix = "/"
service = "upstream"

[control]
listen = "127.0.0.1:$control_port"

[telemetry]
otlp_listen = "off"

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

haproxy_port="$(free_port)"
cat > "$work/haproxy.cfg" <<CONF
global
    nbthread $threads
    maxconn 4096
    pidfile $work/haproxy.pid
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    option forwardfor
    http-reuse always
frontend edge
    bind 127.0.0.1:$haproxy_port
    default_backend upstream
backend upstream
    server upstream1 127.0.0.1:$upstream_port
CONF
"$haproxy_bin" -D -f "$work/haproxy.cfg"

for url in "http://127.0.0.1:$upstream_port/" "http://127.0.0.1:$gateway_port/" \
    "http://127.0.0.1:$proxy_port/" "http://127.0.0.1:$haproxy_port/"; do
    curl -fsS "$url" >/dev/null || { echo "not answering: $url" >&2; exit 1; }
done
curl -fsS -H "authorization: Bearer $token" "http://127.0.0.1:$gateway_port/jwt" >/dev/null \
    || { echo "the gateway refused the bench token" >&2; exit 1; }
status="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$gateway_port/jwt")"
[[ "$status" == 401 ]] || { echo "the JWT route answered $status without a token" >&2; exit 1; }

# CPU each proxy's processes spent per request: steadier than requests/s on shared cores.
flotilla_pid="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$work/app/.flotilla/fleet.json")"
nginx_master="$(cat "$work/proxy.pid")"
declare -A pids=(
    [direct]=""
    [flotilla]="$flotilla_pid"
    [flotilla_jwt]="$flotilla_pid"
    [nginx]="$nginx_master $(pgrep -P "$nginx_master" | tr '\n' ' ')"
    [haproxy]="$(cat "$work/haproxy.pid")"
)
cpu_ticks() {
    local total=0 pid
    for pid in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done
    echo "$total"
}
ticks_per_s="$(getconf CLK_TCK)"

echo "wrk -t$threads -c$connections -d$duration on $(nproc) cores, $rounds interleaved rounds"
declare -A rps p99 cpu
names=(direct flotilla flotilla_jwt nginx haproxy)
declare -A urls=(
    [direct]="http://127.0.0.1:$upstream_port/"
    [flotilla]="http://127.0.0.1:$gateway_port/"
    [flotilla_jwt]="http://127.0.0.1:$gateway_port/jwt"
    [nginx]="http://127.0.0.1:$proxy_port/"
    [haproxy]="http://127.0.0.1:$haproxy_port/"
)
for round in $(seq "$rounds"); do
    for name in "${names[@]}"; do
        extra=()
        [[ "$name" == flotilla_jwt ]] && extra=(-H "authorization: Bearer $token")
        # shellcheck disable=SC2086
        before="$(cpu_ticks ${pids[$name]})"
        measure "$name" "${urls[$name]}" "$duration" "$connections" "${extra[@]}"
        # shellcheck disable=SC2086
        after="$(cpu_ticks ${pids[$name]})"
        rate="rps_$name"; rps[$name]+="${!rate} "
        tail="p99_$name"; p99[$name]+="${!tail} "
        # µs of CPU per request over the measured run (its 2 s warm-up at low load included).
        cpu[$name]+="$(python3 -c "print(($after - $before) / $ticks_per_s * 1e6 / (${!rate} * ${duration%s}))") "
    done
done

args=()
for name in "${names[@]}"; do args+=("$name" "${rps[$name]}" "${p99[$name]}" "${cpu[$name]}"); done
python3 - "${args[@]}" <<'PY'
import statistics, sys

def micros(text):
    for unit, factor in (("us", 1), ("ms", 1e3), ("s", 1e6)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    raise ValueError(text)

args = sys.argv[1:]
rps, p99, cpu = {}, {}, {}
for i in range(0, len(args), 4):
    name = args[i]
    rps[name] = statistics.median(float(x) for x in args[i + 1].split())
    p99[name] = statistics.median(micros(x) for x in args[i + 2].split())
    cpu[name] = statistics.median(float(x) for x in args[i + 3].split())
print("medians:")
for name in rps:
    spent = f"   proxy CPU {cpu[name]:5.1f} µs/request" if name != "direct" else ""
    print(f"  {name:<13} {rps[name]:>10.0f} req/s   p99 {p99[name] / 1000:7.2f} ms{spent}")
print(f"proxy CPU per request: flotilla / nginx = {cpu['flotilla'] / cpu['nginx']:.2f}x, "
      f"flotilla / haproxy = {cpu['flotilla'] / cpu['haproxy']:.2f}x")
for proxy in ("nginx", "haproxy"):
    print(f"flotilla / {proxy:<8} = {rps['flotilla'] / rps[proxy]:.2f}x requests/s, "
          f"p99 {p99['flotilla'] / p99[proxy]:.2f}x (goal: >= 1.00x requests/s, p99 <= 1.00x vs nginx)")
    print(f"flotilla with JWT / {proxy:<8} = {rps['flotilla_jwt'] / rps[proxy]:.2f}x requests/s, "
          f"p99 {p99['flotilla_jwt'] / p99[proxy]:.2f}x")
print(f"JWT validation costs {100 * (1 - rps['flotilla_jwt'] / rps['flotilla']):.1f}% of the gateway's requests/s")
print(f"flotilla / direct = {rps['flotilla'] / rps['direct']:.2f}x requests/s")
PY
