#!/usr/bin/env bash
# Quick, bounded design-cost benchmark: hotswap (the example handler loaded as a plugin,
# called over the C ABI) against static-server (the same handler compiled in, same runtime
# setup). It takes about a minute once built, on 127.0.0.1 only.
#
#   hello:    3 rounds per server of  wrk -t1 -c32 -d5s --latency http://127.0.0.1:PORT/
#   download: 2 rounds per server of  wrk -t1 -c4 -d5s 'http://127.0.0.1:PORT/download?size=67108864'
#
# Rounds alternate between the servers so that drift (thermal, noisy neighbours) hits both.
# Prints medians and hotswap/static ratios and writes them to bench/results/quick-<date>.txt.
# wrk reports binary units, so download throughput is in MiB/s.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
unset RUST_LOG HOTSWAP_LOG # both servers log at info: no per-request lines
export LC_ALL=C

HELLO_ROUNDS=3
DOWNLOAD_ROUNDS=2
DURATION=5s
DOWNLOAD_SIZE=67108864

echo "== building (release)" >&2
cargo build --release -p hotswap -p example-handler -p static-server >&2

if ! command -v wrk >/dev/null; then
    echo "== installing wrk" >&2
    apt-get update >&2 && apt-get install -y wrk >&2
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# start NAME COMMAND...: starts a server, waits for its "listening on" line, sets PORT_<NAME>.
start() {
    local name=$1
    shift
    "$@" 2>"$work/$name.log" >/dev/null &
    pids+=("$!")
    local pid=$! port=
    for _ in $(seq 100); do
        port=$(grep -o 'listening on http://127\.0\.0\.1:[0-9]*' "$work/$name.log" | head -n1 | sed 's/.*://' || true)
        [[ -n $port ]] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited at startup:" >&2
            cat "$work/$name.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    if [[ -z $port ]]; then
        echo "$name did not report its port within 10s:" >&2
        cat "$work/$name.log" >&2
        exit 1
    fi
    printf -v "PORT_$name" '%s' "$port"
    echo "== $name listening on 127.0.0.1:$port (pid $pid)" >&2
}

start hotswap target/release/hotswap serve --listen 127.0.0.1:0 --plugin target/release/libexample_handler.so
start static target/release/static-server --listen 127.0.0.1:0
servers=(hotswap static)
port() { local v="PORT_$1"; echo "${!v}"; }

for s in "${servers[@]}"; do
    body=$(curl -fsS "http://127.0.0.1:$(port "$s")/")
    [[ $body == "hello from example-handler"* ]] || { echo "$s answered GET / with: $body" >&2; exit 1; }
    wrk -t1 -c32 -d1s "http://127.0.0.1:$(port "$s")/" >/dev/null # warm-up
done

# Turns wrk output into "rps p50_ms p99_ms mib_per_s errors" (errors: non-2xx + socket errors).
parse() {
    awk '
        function ms(v) {
            if (v ~ /us$/) return v / 1000
            if (v ~ /ms$/) return v + 0
            if (v ~ /m$/) return v * 60000
            return v * 1000
        }
        function mib(v) {
            if (v ~ /TB$/) return v * 1048576
            if (v ~ /GB$/) return v * 1024
            if (v ~ /MB$/) return v + 0
            if (v ~ /KB$/) return v / 1024
            return v / 1048576
        }
        /^Requests\/sec:/ { rps = $2 }
        /^Transfer\/sec:/ { mb = mib($2) }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        /Non-2xx or 3xx responses:/ { err += $NF }
        /Socket errors:/ { err += $4 + $6 + $8 + $10 }
        END { printf "%s %s %s %s %d\n", rps + 0, p50 + 0, p99 + 0, mb + 0, err }
    '
}

for round in $(seq "$HELLO_ROUNDS"); do
    for s in "${servers[@]}"; do
        echo "== hello round $round: $s" >&2
        wrk -t1 -c32 -d"$DURATION" --latency "http://127.0.0.1:$(port "$s")/" >"$work/hello-$s-$round.txt"
        parse <"$work/hello-$s-$round.txt" >>"$work/hello-$s"
    done
done
for round in $(seq "$DOWNLOAD_ROUNDS"); do
    for s in "${servers[@]}"; do
        echo "== download round $round: $s" >&2
        wrk -t1 -c4 -d"$DURATION" "http://127.0.0.1:$(port "$s")/download?size=$DOWNLOAD_SIZE" >"$work/dl-$s-$round.txt"
        parse <"$work/dl-$s-$round.txt" >>"$work/dl-$s"
    done
done

# median FILE COLUMN
median() {
    sort -g -k"$2,$2" "$1" | awk -v c="$2" '{ v[NR] = $c } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
total() { awk -v c="$2" '{ t += $c } END { print t + 0 }' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.3f", a / b }'; }

for s in "${servers[@]}"; do
    declare "rps_$s=$(median "$work/hello-$s" 1)" "p50_$s=$(median "$work/hello-$s" 2)" \
        "p99_$s=$(median "$work/hello-$s" 3)" "mib_$s=$(median "$work/dl-$s" 4)" \
        "err_$s=$(($(total "$work/hello-$s" 5) + $(total "$work/dl-$s" 5)))"
done

mkdir -p bench/results
out="bench/results/quick-$(date -u +%Y%m%d-%H%M%S).txt"
{
    echo "hotswap quick benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)'), $(nproc) CPUs, $(uname -sr), $(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2)"
    echo "hello:    median of $HELLO_ROUNDS x wrk -t1 -c32 -d$DURATION --latency /"
    echo "download: median of $DOWNLOAD_ROUNDS x wrk -t1 -c4 -d$DURATION /download?size=$DOWNLOAD_SIZE"
    echo
    printf '%-16s %12s %10s %10s %12s %8s\n' server "req/s" "p50 ms" "p99 ms" "dl MiB/s" errors
    for s in "${servers[@]}"; do
        r="rps_$s" a="p50_$s" b="p99_$s" m="mib_$s" e="err_$s"
        printf '%-16s %12.0f %10.3f %10.3f %12.1f %8d\n' "$s" "${!r}" "${!a}" "${!b}" "${!m}" "${!e}"
    done
    printf '%-16s %12s %10s %10s %12s\n' "hotswap/static" "$(ratio "$rps_hotswap" "$rps_static")" \
        "$(ratio "$p50_hotswap" "$p50_static")" "$(ratio "$p99_hotswap" "$p99_static")" "$(ratio "$mib_hotswap" "$mib_static")"
    echo
    echo "per round (req/s p50_ms p99_ms MiB/s errors):"
    for s in "${servers[@]}"; do
        echo "  $s hello:    $(paste -sd'|' "$work/hello-$s" | sed 's/|/ | /g')"
        echo "  $s download: $(paste -sd'|' "$work/dl-$s" | sed 's/|/ | /g')"
    done
    for s in "${servers[@]}"; do
        if grep -Eq 'WARN|ERROR' "$work/$s.log"; then
            echo
            echo "$s logged warnings or errors:"
            grep -E 'WARN|ERROR' "$work/$s.log" | head -n 20
        fi
    done
} | tee "$out"
echo "== written to $out" >&2
