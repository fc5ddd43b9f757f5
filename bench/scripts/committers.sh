#!/usr/bin/env bash
# The storage pool end to end over RabbitMQ with 1, 2 and 4 commits in flight
# (`--committers`), each run beside a broker ceiling measured just before it:
#
#   cargo build --release --workspace --bins
#   bash bench/scripts/committers.sh [READINGS] [COMMITTERS...]    # default 5000000  1 2 4
#
# Each run: a fresh `sluice process` on its own namespace and table directory, then
# loadgen straight to the broker (`--target amqp`), saturating, waiting for every commit
# receipt. Throughput = committed readings / wall time of the loadgen run. Needs RabbitMQ
# and Redis on loopback (scripts/services.sh) and guest access to the broker.
set -euo pipefail
cd "$(dirname "$0")/../.."
readings=${1:-5000000}
shift || true
committers=("${@:-1 2 4}")
# shellcheck disable=SC2206
committers=(${committers[*]})
amqp=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
redis=${REDIS_URL:-redis://127.0.0.1:6379}
bin=target/release
work=$(mktemp -d /tmp/sluice-committers.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

echo "| committers | broker ceiling before the run (readings/s) | committed | wall | readings/s | ratio to ceiling | sluice process CPU |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
for n in "${committers[@]}"; do
    ceiling=$("$bin/broker-ceiling" --amqp-url "$amqp" --messages 20000 --readings 500 \
        | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["readings_per_sec"]))')
    ns="bc${n}x$RANDOM"
    "$bin/sluice" process --store "$work/$ns" --redis-url "$redis" --redis-prefix "$ns" \
        --namespace "$ns" --committers "$n" --metrics-listen "" --admin-listen "" --log warn \
        --amqp-url "$amqp" &
    pid=$!
    sleep 3
    start=$(date +%s.%N)
    out=$("$bin/loadgen" --target amqp --amqp-url "$amqp" --namespace "$ns" --tenant demo \
        --count "$readings" --rate 100000000 --duration 600s --drain-timeout 600s \
        --json --quiet --out "$work/results-$ns")
    end=$(date +%s.%N)
    cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$pid/stat")
    kill -TERM "$pid"
    wait "$pid" || true
    committed=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["committed"])' "$out")
    python3 - "$n" "$ceiling" "$committed" "$start" "$end" "$cpu" <<'PY'
import sys
n, ceiling, committed, start, end, cpu = sys.argv[1:]
wall = float(end) - float(start)
rate = int(committed) / wall
print(f"| {n} | {int(ceiling)/1e6:.2f} M | {int(committed):,} | {wall:.1f} s | {rate/1e6:.2f} M | {100*rate/int(ceiling):.0f} % | {float(cpu):.1f} s ({1e9*float(cpu)/int(committed):.0f} ns/reading) |")
PY
done
