# Shared by the bench scripts: tools, ports, an nginx upstream run by Flotilla, wrk figures.
# Source it after `set -euo pipefail` and `cd` to the repository root.

threads=2

need() {
    local missing=()
    for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if ((${#missing[@]})); then
        echo "installing ${missing[*]}..." >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# upstream_service DIR: prints a [services.upstream] block running nginx with a small static
# answer on the instance's $PORT; its config lives in DIR.
upstream_service() {
    local dir="$1" nginx_bin
    nginx_bin="$(command -v nginx)"
    mkdir -p "$dir"
    cat > "$dir/nginx.conf.in" <<CONF
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $dir; proxy_temp_path $dir;
    fastcgi_temp_path $dir; uwsgi_temp_path $dir; scgi_temp_path $dir;
    server {
        listen 127.0.0.1:@PORT@;
        location / { default_type text/plain; return 200 "hello from upstream\n"; }
    }
}
CONF
    cat <<TOML
[services.upstream]
run = "sh -c 'sed s/@PORT@/\$PORT/ $dir/nginx.conf.in > $dir/nginx.conf && exec $nginx_bin -p $dir -c $dir/nginx.conf'"
health = { path = "/", interval = "1s" }
TOML
}

# instance_port FLOTILLA DIR SERVICE: the port of the service's first instance.
instance_port() {
    "$1" status -C "$2" --json | python3 -c 'import json,sys; print([i for i in json.load(sys.stdin)["instances"] if i["service"]==sys.argv[1]][0]["port"])' "$3"
}

# measure NAME URL DURATION CONNECTIONS [WRK ARGS...]: one wrk run after a short warm-up; prints
# a line and sets rps_NAME, p99_NAME.
measure() {
    local name="$1" url="$2" duration="$3" connections="$4" out rps p50 p99
    shift 4
    wrk -t1 -c2 -d2s "$@" "$url" >/dev/null # warm up pools and caches
    out="$(wrk -t"$threads" -c"$connections" -d"$duration" --latency "$@" "$url")"
    if grep -q 'Non-2xx' <<<"$out"; then
        echo "$name: not every answer was 2xx; the figures would measure refusals:" >&2
        echo "$out" >&2
        exit 1
    fi
    rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
    p50="$(awk '$1 == "50%" {print $2}' <<<"$out")"
    p99="$(awk '$1 == "99%" {print $2}' <<<"$out")"
    printf '%-12s %12s req/s   p50 %9s   p99 %9s\n' "$name" "$rps" "$p50" "$p99"
    eval "rps_$name=$rps"
    eval "p99_$name=$p99"
}
