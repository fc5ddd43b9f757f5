#!/usr/bin/env bash
# A noisy neighbour: tenant acme sends at a steady rate over HTTP while tenant mallory
# offers ten times its quota, through one `sluice ingest` and one `sluice process`
# (issue #9, hole 5). Four runs, each on a fresh namespace and table:
#
#   alone     acme only;
#   quota     acme, and mallory offering 10x its quota (quotas in the tenants file);
#   quota, flood at another ingest
#             the control: mallory's same flood at a second ingest process, so acme's
#             ingest does none of the refusing and only the machine is shared;
#   no quota  the same load with no quota for anyone: what the quota buys.
#
#   cargo build --release --workspace --bins
#   bash bench/scripts/neighbours.sh [SECONDS] [ACME_RATE] [QUOTA]   # default 30 20000 50000
#
# acme's figures are loadgen's: send→accept (corrected for coordinated omission) and
# device→committed from the commit receipts of its own tenant. A broker ceiling is
# measured before the runs. Needs RabbitMQ and Redis on loopback (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-30}
acme_rate=${2:-20000}
quota=${3:-50000}
flood=$((quota * 10))
amqp=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
redis=${REDIS_URL:-redis://127.0.0.1:6379}
bin=target/release
work=$(mktemp -d /tmp/sluice-neighbours.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

ceiling=$("$bin/broker-ceiling" --amqp-url "$amqp" --messages 20000 --readings 500 \
    | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["readings_per_sec"]))')
echo "broker ceiling before the runs: $ceiling readings/s; acme offers $acme_rate/s, mallory $flood/s (10x a quota of $quota/s), ${secs} s each"
echo
echo "| run | acme accepted/s | acme send→accept p50 / p99 / p99.9 | acme device→committed p50 / p99 | mallory accepted/s | mallory refused (429) |"
echo "|---|---:|---:|---:|---:|---:|"

run() {
    local name=$1 with_quota=$2 with_mallory=$3
    local ns="nb$RANDOM$RANDOM" port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    local q=""
    if [[ $with_quota == yes ]]; then
        q="quota = { readings_per_sec = $quota, bytes_per_sec = $((quota * 400)) }"
    fi
    cat >"$work/$ns.toml" <<EOF
[[tenant]]
id = "acme"
api_keys = ["acme-key"]
$q

[[tenant]]
id = "mallory"
api_keys = ["mallory-key"]
$q
EOF
    "$bin/sluice" process --store "$work/$ns" --redis-url "$redis" --redis-prefix "$ns" \
        --namespace "$ns" --metrics-listen "" --admin-listen "" --log warn \
        --amqp-url "$amqp" &
    local process=$!
    "$bin/sluice" ingest --listen "127.0.0.1:$port" --tenants "$work/$ns.toml" \
        --namespace "$ns" --metrics-listen "" --log warn --amqp-url "$amqp" &
    local ingest=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
        sleep 0.2
    done
    local mallory="" mport=$port other=""
    if [[ $with_mallory == elsewhere ]]; then
        # The control: the same flood at an ingest process of its own, so only the
        # machine (cores, broker) is shared with acme's ingest.
        mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
        "$bin/sluice" ingest --listen "127.0.0.1:$mport" --tenants "$work/$ns.toml" \
            --namespace "$ns" --metrics-listen "" --log warn --amqp-url "$amqp" &
        other=$!
        for _ in $(seq 100); do
            curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null && break
            sleep 0.2
        done
    fi
    if [[ $with_mallory != no ]]; then
        "$bin/loadgen" --target http --url "http://127.0.0.1:$mport" --api-key mallory-key \
            --tenant mallory --amqp-url "$amqp" --namespace "$ns" --device-prefix m- --devices 1000 \
            --rate "$flood" --batch-size 500 --concurrency 64 --duration "$((secs + 4))s" \
            --drain-timeout 5s --json --quiet --out "$work/m-$ns" >/dev/null &
        mallory=$!
        sleep 2
    fi
    "$bin/loadgen" --target http --url "http://127.0.0.1:$port" --api-key acme-key \
        --tenant acme --amqp-url "$amqp" --namespace "$ns" --device-prefix acme- \
        --devices 200 --rate "$acme_rate" --batch-size 100 --concurrency 32 \
        --duration "${secs}s" --drain-timeout 60s --json --quiet --out "$work/a-$ns" \
        >/dev/null || true
    local m_summary="$work/m-$ns/summary.json"
    if [[ -n $mallory ]]; then
        wait "$mallory" || true
    else
        m_summary="$work/none.json"
        echo '{}' >"$m_summary"
    fi
    kill -TERM "$ingest" "$process" $other
    wait "$ingest" "$process" $other || true
    python3 - "$name" "$work/a-$ns/summary.json" "$m_summary" <<'PY'
import json, sys
name, a, m = sys.argv[1:]
a = json.load(open(a))
m = json.load(open(m))
def stats(s, series):
    for x in s.get("latency", []):
        if x["name"] == series:
            return x["stats"]
    return {}
acc = stats(a, "send→accept (corrected)")
e2e = stats(a, "end-to-end device→committed")
secs = lambda s: s["duration"]["secs"] + s["duration"]["nanos"] / 1e9
m_rate = f'{m["readings_per_sec"]/1e3:.0f} k' if m else "—"
m_rej = f'{m["rejected"]:,}' if m else "—"
print(f'| {name} | {a["readings_per_sec"]/1e3:.1f} k | {acc.get("p50_ms",0):.1f} / {acc.get("p99_ms",0):.1f} / {acc.get("p999_ms",0):.1f} ms '
      f'| {e2e.get("p50_ms",0):.0f} / {e2e.get("p99_ms",0):.0f} ms | {m_rate} | {m_rej} |')
PY
}

run alone yes no
run quota yes yes
run "quota, flood at another ingest" yes elsewhere
run "no quota" no yes
