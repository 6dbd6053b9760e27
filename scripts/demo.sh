#!/usr/bin/env bash
# The demo behind the README's first command (`make demo`): a hot update of a running container
# under load. It builds the demo app in two versions, imports both as images, runs v1, drives
# keep-alive clients, runs `hot update demo demo:v2 --reload-signal HUP`, and shows that no
# request failed, the connections and the counter survived and the version switched.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
hot=${1:-bin/hot}
hot=$(realpath "$hot")
work=$(mktemp -d /tmp/hot-demo.XXXXXX)
trap 'kill $loadpid 2>/dev/null || true; rm -rf "$work"' EXIT
loadpid=

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build the demo app (v1, v2) and the load client"
for v in v1 v2; do
	mkdir -p "$work/$v/etc/demo" "$work/$v/var/lib/demo" "$work/$v/tmp"
	CGO_ENABLED=0 go build -trimpath -ldflags "-X main.version=$v" -o "$work/$v/app" ./demo/app
	echo "$v" >"$work/$v/etc/demo/version"
done
echo "notes that only v2 ships" >"$work/v2/etc/demo/v2-notes"
CGO_ENABLED=0 go build -o "$work/load" ./demo/load

step "import both versions as images"
for v in v1 v2; do
	"$hot" image import --rootfs "$work/$v" --tag "demo:$v" \
		--entrypoint /app --cmd -listen --cmd :8080 --cmd -write-on-start --cmd /var/lib/demo/written-by-v1
done
"$hot" image ls

step "run demo:v1"
"$hot" rm -f demo >/dev/null 2>&1 || true
"$hot" run -d --name demo demo:v1 >/dev/null
ip=$("$hot" inspect demo --json | sed -n 's/.*"ip": *"\([0-9.]*\)".*/\1/p' | head -1)
for _ in $(seq 50); do curl -fs "http://$ip:8080/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
echo "demo runs at $ip:8080: $(curl -fs "http://$ip:8080/")"

step "drive 4 keep-alive clients"
"$work/load" -addr "$ip:8080" -clients 4 -interval 5ms >"$work/load.out" &
loadpid=$!
sleep 2

step "hot update demo demo:v2 --reload-signal HUP"
"$hot" update demo demo:v2 --reload-signal HUP --health-http 8080/healthz
sleep 2

step "what the clients saw"
kill -INT $loadpid
wait $loadpid && rc=0 || rc=$?
loadpid=
cat "$work/load.out"

step "after the update"
echo "answer:               $(curl -fs "http://$ip:8080/")"
echo "file written by v1:   $(curl -fs "http://$ip:8080/cat?path=/var/lib/demo/written-by-v1")"
echo "file new in v2:       $(curl -fs "http://$ip:8080/cat?path=/etc/demo/v2-notes")"
"$hot" history demo
echo
echo "The container keeps running: try '$hot inspect demo', '$hot events demo', '$hot rollback demo',"
echo "and '$hot rm -f demo' to remove it."
exit $rc
