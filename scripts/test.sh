#!/usr/bin/env bash
# The test command: format, lints and the whole test suite, broker and Redis tests included.
#
#   bash scripts/test.sh
#
# It first makes sure RabbitMQ, Redis, the test venv and an S3 server are there
# (scripts/services.sh: reuses running services, installs/starts what is missing), then runs
#
#   cargo fmt --all -- --check
#   cargo clippy --workspace --all-targets --features broker-tests -- -D warnings
#   cargo test   --workspace --features broker-tests
#   bash scripts/fuzz.sh        (each fuzz target 20 s from its committed corpus)
#
# with AMQP_ADDR, REDIS_URL, SLUICE_PYTHON, SLUICE_S3_ENDPOINT and SLUICE_S3_BUCKET exported (values already set in the
# environment win, so you can point the tests at other services). With CI=true, cargo also
# gets --locked. CI runs this script through .ci/run.
set -euo pipefail

# The cargo feature that turns on the tests needing a real broker and Redis. Every crate
# with such tests defines it; cargo enables it on each selected crate that has it.
FEATURES="broker-tests"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n==> %s\n' "$*" >&2; }

locked=()
if [[ ${CI:-} == true ]]; then
    locked=(--locked)
fi

step "services (scripts/services.sh)"
services_env="$(bash scripts/services.sh)"
# services.sh prints only KEY=value lines (shell-quoted) on stdout.
while IFS= read -r line; do
    case $line in
    AMQP_ADDR=* | REDIS_URL=* | SLUICE_PYTHON=* | SLUICE_S3_ENDPOINT=* | SLUICE_S3_BUCKET=*)
        key=${line%%=*}
        if [[ -z ${!key:-} ]]; then
            eval "export $line"
        else
            export "${key?}"
        fi
        ;;
    esac
done <<<"$services_env"
for key in AMQP_ADDR REDIS_URL SLUICE_PYTHON SLUICE_S3_ENDPOINT SLUICE_S3_BUCKET; do
    [[ -n ${!key:-} ]] || {
        echo "test.sh: services.sh did not report $key" >&2
        exit 1
    }
    printf '%s=%s\n' "$key" "${!key}" >&2
done

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

# compose.yaml requires its credentials; placeholders are enough to check it.
compose_env=(RABBITMQ_PASSWORD="${RABBITMQ_PASSWORD:-compose-check}"
    GRAFANA_ADMIN_PASSWORD="${GRAFANA_ADMIN_PASSWORD:-compose-check}"
    MINIO_PASSWORD="${MINIO_PASSWORD:-compose-check}")
if command -v docker-compose >/dev/null 2>&1; then
    step "docker-compose config -q (compose.yaml)"
    env "${compose_env[@]}" docker-compose -f compose.yaml config -q
    step "docker-compose config -q (compose.yaml with compose.cluster.yaml)"
    env "${compose_env[@]}" RABBITMQ_ERLANG_COOKIE=compose-check \
        docker-compose -f compose.yaml -f compose.cluster.yaml config -q
elif docker compose version >/dev/null 2>&1; then
    step "docker compose config -q (compose.yaml)"
    env "${compose_env[@]}" docker compose -f compose.yaml config -q
    step "docker compose config -q (compose.yaml with compose.cluster.yaml)"
    env "${compose_env[@]}" RABBITMQ_ERLANG_COOKIE=compose-check \
        docker compose -f compose.yaml -f compose.cluster.yaml config -q
else
    step "compose.yaml not checked: neither docker-compose nor docker compose is installed"
fi

step "python example compiles"
"$SLUICE_PYTHON" -m py_compile examples/python/publish.py

step "cargo clippy --workspace --all-targets --features $FEATURES -- -D warnings"
cargo clippy "${locked[@]}" --workspace --all-targets --features "$FEATURES" -- -D warnings

step "cargo test --workspace --features $FEATURES"
cargo test "${locked[@]}" --workspace --features "$FEATURES"

step "bounded fuzz run (scripts/fuzz.sh, ${FUZZ_SECONDS:-20} s per target)"
bash scripts/fuzz.sh

step "all tests passed"
