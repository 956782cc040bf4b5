# Sourced by bench-proxy and instructions-proxy: what both build before their proxies. Needs
# W (a scratch directory, cleaned by the caller) and T (the trellis binary); starts the app
# (nginx, one worker, on APP) and a trellis control node (API on AP, gRPC on GP) with the mesh
# "bench", and defines free_port, wait_http and put (a PUT to the control node's API).
# WAIT_TRIES: how many tenths of a second wait_http waits (300; more for proxies under valgrind).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq "${WAIT_TRIES:-300}"); do curl -sf "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not answering: $*" >&2; exit 1; }

# --- the app: nginx, one worker
APP=$(free_port)
cat > "$W/nginx.conf" <<N
worker_processes 1; pid $W/nginx.pid; error_log $W/nginx.err; daemon on;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$APP reuseport; location / { return 200 "hello from the app\n"; } } }
N
nginx -c "$W/nginx.conf"
wait_http "http://127.0.0.1:$APP/"

# --- a trellis control node, with the mesh
AP=$(free_port); GP=$(free_port); DP=$(free_port)
cat > "$W/control.toml" <<K
data_dir = "$W/control"
api_addr = "127.0.0.1:$AP"
grpc_addr = "127.0.0.1:$GP"
dns_addr = "127.0.0.1:$DP"
log = "warn"
tls = false
auth = "none"
K
$T control --config "$W/control.toml" 2> "$W/control.log" &
wait_http "http://127.0.0.1:$AP/v1/health"
put() { curl -sf -X PUT -H 'content-type: application/json' "http://127.0.0.1:$AP$1" -d "$2" >/dev/null; }
put /v20190125/meshes '{"meshName":"bench"}'
