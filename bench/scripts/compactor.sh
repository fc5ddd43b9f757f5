#!/usr/bin/env bash
# Ingest throughput with the compactor merging a closed day into the same table, against
# the same ingest without it:
#
#   cargo build --release --workspace --bins
#   bash bench/scripts/compactor.sh [READINGS] [HOURS]     # default 10000000 readings, 6 h
#
# A closed day of small files is written first (`table-day --write-only`: HOURS simulated
# hours at 1 000 readings/s, a commit per second, on 2026-11-21); the table is copied, and
# each copy takes the same saturating load (`loadgen --target amqp` → `sluice process`),
# once alone and once with `sluice maintain --once` (compaction of the closed day, one
# task, then vacuum) started with the load, with its defaults (its I/O budget, nice 19).
# MAINTAIN_ARGS adds flags to the pass: "--nice 0" keeps normal priority,
# "--io-mib-per-sec 0 --io-requests-per-sec 0" lifts the budget. MAINTAIN_WRAP prefixes the
# pass's command (MAINTAIN_WRAP="chrt --idle 0": SCHED_IDLE, only cycles nothing else
# wants). PAIRS (2) sets how many alone/with-compactor pairs run; a broker ceiling is
# measured before each run (`broker-ceiling`, 20 000 messages of 500 readings). PASS_KILL=1
# stops the pass when the load ends (to compare budgets without waiting out each pass).
# Needs RabbitMQ and Redis on loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."
readings=${1:-10000000}
hours=${2:-6}
amqp=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
redis=${REDIS_URL:-redis://127.0.0.1:6379}
bin=target/release
work=$(mktemp -d /tmp/sluice-compactor.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

"$bin/table-day" --store "$work/pristine" --hours "$hours" --flush 1s --write-only
echo "| run | broker ceiling before the run | committed | wall | readings/s | ratio to ceiling | compaction pass |"
echo "|---|---:|---:|---:|---:|---:|---|"
runs=()
for _ in $(seq "${PAIRS:-2}"); do runs+=(alone with-compactor); done
for run in "${runs[@]}"; do
    cp -a "$work/pristine" "$work/$run"
    ceiling=$("$bin/broker-ceiling" --amqp-url "$amqp" --messages 20000 --readings 500 \
        | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["readings_per_sec"]))')
    ns="cx$RANDOM"
    "$bin/sluice" process --store "$work/$run" --redis-url "$redis" --redis-prefix "$ns" \
        --namespace "$ns" --metrics-listen "" --admin-listen "" --log warn --amqp-url "$amqp" &
    pid=$!
    sleep 3
    pass="—"
    if [ "$run" = with-compactor ]; then
        ${MAINTAIN_WRAP:-} "$bin/sluice" maintain --store "$work/$run" --once --vacuum-grace 0s \
            --metrics-listen "" --log warn ${MAINTAIN_ARGS:-} > "$work/pass.txt" 2>&1 &
        passpid=$!
    fi
    start=$(date +%s.%N)
    out=$("$bin/loadgen" --target amqp --amqp-url "$amqp" --namespace "$ns" --tenant demo \
        --count "$readings" --rate 100000000 --duration 600s --drain-timeout 600s \
        --json --quiet --out "$work/results-$ns")
    end=$(date +%s.%N)
    if [ "$run" = with-compactor ]; then
        if [ -n "${PASS_KILL:-}" ]; then
            # Only the load's overlap with the pass's start is measured: stop the pass.
            kill -KILL "$passpid" 2>/dev/null || true
        fi
        wait "$passpid" || true
        pass_end=$(date +%s.%N)
        pass="$(python3 -c 'import sys; print(f"{float(sys.argv[1]) - float(sys.argv[2]):.1f} s from the load start", end="")' "$pass_end" "$start"): $(tail -1 "$work/pass.txt")"
    fi
    kill -TERM "$pid"
    wait "$pid" || true
    committed=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["committed"])' "$out")
    python3 - "$run" "$ceiling" "$committed" "$start" "$end" "$pass" <<'PY'
import sys
run, ceiling, committed, start, end, passed = sys.argv[1:]
wall = float(end) - float(start)
rate = int(committed) / wall
print(f"| {run} | {int(ceiling)/1e6:.2f} M | {int(committed):,} | {wall:.1f} s | {rate/1e6:.2f} M | {100*rate/int(ceiling):.0f} % | {passed} |")
PY
    rm -rf "$work/$run"
done
