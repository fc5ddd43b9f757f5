#!/usr/bin/env bash
# Make sure the services the test suite talks to are up, and say how to reach them:
#
#   - RabbitMQ on 127.0.0.1:5672 (user guest/guest, vhost /)
#   - Redis    on 127.0.0.1:6379
#   - a Python venv at .venv with the test requirements (scripts/requirements-test.txt:
#     the example publisher's pika and msgpack, moto, deltalake)
#   - an S3-compatible server on 127.0.0.1:9555 (moto's standalone server from that venv)
#     with the bucket sluice-test
#   - docker-compose, to check compose.yaml (Debian's package; no Docker engine)
#
# Idempotent: whatever is already running (a local node, or the `docker compose` services
# with their ports published) is reused; only what is missing is installed or started.
# Installing needs root and apt (Debian/Ubuntu); CI runs this as root on a fresh Debian 12.
#
# Progress goes to stderr; stdout gets only the environment the tests read, one KEY=value
# per line, so both of these work:
#
#   bash scripts/services.sh
#   eval "$(bash scripts/services.sh)"     # sets (does not export) the variables
#
# The script exports nothing and may also be sourced; it then runs as a child process and
# leaves the caller's shell options and variables alone.

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    if bash "${BASH_SOURCE[0]}" "$@"; then return 0; else return 1; fi
fi

set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
amqp_host=127.0.0.1 amqp_port=5672 redis_host=127.0.0.1 redis_port=6379
venv="$root/.venv"
requirements="$root/scripts/requirements-test.txt"
s3_host=127.0.0.1 s3_port=9555 s3_bucket=sluice-test
apt_updated=0

say() { printf 'services.sh: %s\n' "$*" >&2; }
die() {
    printf 'services.sh: error: %s\n' "$*" >&2
    exit 1
}
# Runs "$@" and reports how long it took.
timed() {
    local start=$SECONDS rc=0
    "$@" || rc=$?
    if [[ $rc -eq 0 ]]; then
        say "  ... done in $((SECONDS - start))s"
    else
        say "  ... failed (exit $rc) after $((SECONDS - start))s"
    fi
    return "$rc"
}
have() { command -v "$1" >/dev/null 2>&1; }
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif have sudo; then
        sudo "$@"
    else
        die "need root to run: $* (run as root, or install sudo)"
    fi
}
apt_install() {
    have apt-get || die "cannot install $* without apt-get; install it yourself and re-run"
    if [[ $apt_updated -eq 0 ]]; then
        say "apt-get update"
        timed as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 ||
            die "apt-get update failed"
        apt_updated=1
    fi
    say "apt-get install -y $*"
    timed as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "$@" >&2 || die "apt-get install $* failed"
}
# True when something accepts TCP connections on host:port.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# ---------------------------------------------------------------- Redis
redis_ok() {
    if have redis-cli; then
        [[ $(timeout 5 redis-cli -h "$redis_host" -p "$redis_port" ping 2>/dev/null) == PONG ]]
    else
        # No client installed: speak the protocol by hand.
        timeout 5 bash -c "exec 3<>/dev/tcp/$redis_host/$redis_port &&
            printf 'PING\r\n' >&3 && IFS= read -r line <&3 && [[ \$line == +PONG* ]]" \
            2>/dev/null
    fi
}

ensure_redis() {
    if redis_ok; then
        say "Redis: already running on $redis_host:$redis_port, reusing it"
        return
    fi
    if port_open "$redis_host" "$redis_port"; then
        die "something listens on $redis_host:$redis_port but does not answer Redis PING"
    fi
    if ! have redis-server || ! have redis-cli; then
        say "Redis: not installed"
        apt_install redis-server
        # On a machine with systemd the package starts the service itself.
        if [[ -d /run/systemd/system ]]; then
            local _
            for _ in $(seq 1 20); do
                redis_ok && break
                sleep 0.5
            done
            if redis_ok; then
                say "Redis: started by the package, reusing it"
                return
            fi
        fi
    fi
    say "Redis: starting redis-server --daemonize yes (log /tmp/sluice-redis.log)"
    # No persistence and /tmp as working dir, so no dump.rdb lands in the repository.
    redis-server --daemonize yes --bind "$redis_host" --port "$redis_port" \
        --save '' --appendonly no --dir /tmp --logfile /tmp/sluice-redis.log >&2 ||
        die "redis-server failed to start; see /tmp/sluice-redis.log"
    local start=$SECONDS
    until redis_ok; do
        if ((SECONDS - start > 20)); then
            tail -n 20 /tmp/sluice-redis.log >&2 || true
            die "Redis did not answer PING within 20s"
        fi
        sleep 0.2
    done
    say "Redis: up after $((SECONDS - start))s"
}

# ------------------------------------------------------------- RabbitMQ
# True when an AMQP 0-9-1 broker answers on the port: send the protocol header and expect
# the first byte of a method frame (Connection.Start) back.
amqp_ok() {
    timeout 5 bash -c "exec 3<>/dev/tcp/$amqp_host/$amqp_port &&
        printf 'AMQP\\x00\\x00\\x09\\x01' >&3 &&
        [[ \$(head -c 1 <&3 | od -An -tx1) == ' 01' ]]" 2>/dev/null
}

# Debian's rabbitmqctl and rabbitmq-server only work as root (they switch to the rabbitmq
# user); elsewhere go through `sudo -n`, which fails instead of prompting.
# Usage: rabbitmqctl_ <timeout seconds> <rabbitmqctl arguments...>
rabbitmqctl_() {
    local secs=$1
    shift
    if [[ $(id -u) -eq 0 ]]; then
        timeout "$secs" rabbitmqctl "$@"
    elif have sudo; then
        timeout "$secs" sudo -n rabbitmqctl "$@"
    else
        return 1
    fi
}
rabbit_status_ok() { rabbitmqctl_ 30 -q status >/dev/null 2>&1; }

rabbit_logs() {
    local f
    for f in /var/log/rabbitmq/startup_err /var/log/rabbitmq/startup_log \
        /var/log/rabbitmq/rabbit@*.log; do
        [[ -s $f ]] || continue
        printf '%s\n' "---- tail $f" >&2
        tail -n 30 "$f" >&2 || true
    done
}

# The node is named rabbit@<hostname>; Erlang distribution needs that name to resolve.
# Containers sometimes have a hostname that does not; fall back to rabbit@localhost.
rabbit_fix_nodename() {
    local host conf=/etc/rabbitmq/rabbitmq-env.conf
    host="$(hostname -s 2>/dev/null || hostname)"
    if getent hosts "$host" >/dev/null 2>&1; then
        return
    fi
    if [[ -f $conf ]] && grep -q '^NODENAME=' "$conf"; then
        return
    fi
    say "RabbitMQ: hostname '$host' does not resolve; setting NODENAME=rabbit@localhost in $conf"
    as_root mkdir -p /etc/rabbitmq
    printf 'NODENAME=rabbit@localhost\n' | as_root tee -a "$conf" >/dev/null
}

rabbit_await() {
    say "RabbitMQ: waiting for the node (rabbitmqctl await_startup, up to 120s)"
    local start=$SECONDS
    # Right after `-detached` the node is not yet registered with epmd and await_startup
    # fails at once, so retry it until it succeeds or the deadline passes.
    until rabbitmqctl_ 30 -q await_startup --timeout 20 >/dev/null 2>&1; do
        if ((SECONDS - start > 120)); then
            rabbitmqctl_ 30 -q await_startup --timeout 5 >&2 || true
            rabbit_logs
            die "RabbitMQ did not finish starting within 120s (see above and /var/log/rabbitmq)"
        fi
        sleep 1
    done
    # await_startup returns when the node has booted; wait for the AMQP listener as well.
    until port_open "$amqp_host" "$amqp_port"; do
        if ((SECONDS - start > 130)); then
            rabbit_logs
            die "RabbitMQ runs but nothing listens on $amqp_host:$amqp_port"
        fi
        sleep 0.2
    done
    say "RabbitMQ: up after $((SECONDS - start))s"
}

ensure_rabbitmq() {
    if have rabbitmqctl && rabbit_status_ok; then
        say "RabbitMQ: local node already running, reusing it"
        port_open "$amqp_host" "$amqp_port" ||
            die "the local RabbitMQ node runs but nothing listens on $amqp_host:$amqp_port"
        return
    fi
    if amqp_ok; then
        # Not a node rabbitmqctl can see: most likely `docker compose up rabbitmq`.
        say "RabbitMQ: an AMQP broker already answers on $amqp_host:$amqp_port, reusing it"
        return
    fi
    if port_open "$amqp_host" "$amqp_port"; then
        die "something listens on $amqp_host:$amqp_port but does not speak AMQP 0-9-1"
    fi
    if ! have rabbitmq-server || ! have rabbitmqctl; then
        say "RabbitMQ: not installed"
        apt_install rabbitmq-server
    fi
    rabbit_fix_nodename
    # On a machine with systemd the package starts the node itself; it may still boot.
    if rabbit_status_ok || pgrep -u rabbitmq -f 'beam.*rabbit' >/dev/null 2>&1; then
        say "RabbitMQ: a node is starting (started by the package?), waiting for it"
    else
        say "RabbitMQ: starting rabbitmq-server -detached (logs in /var/log/rabbitmq)"
        # As root, Debian's wrapper switches to the rabbitmq user (HOME=/var/lib/rabbitmq,
        # which holds the Erlang cookie), so no RABBITMQ_* variables are needed.
        as_root rabbitmq-server -detached >&2 || {
            rabbit_logs
            die "rabbitmq-server -detached failed"
        }
    fi
    rabbit_await
}

# --------------------------------------------------------------- Python
ensure_python() {
    local py="$venv/bin/python"
    local modules='import pika, msgpack, moto, deltalake, pyarrow'
    if "$py" -c "$modules" 2>/dev/null; then
        say "Python: $venv already has the test requirements"
        return
    fi
    if [[ -e $venv ]]; then
        # Never delete a venv we did not just create.
        "$py" -c 'import sys' 2>/dev/null ||
            die "$venv exists but $py does not run (made by another user, or its base" \
                "interpreter is gone); remove $venv and re-run"
    else
        local base
        base="$(command -v python3 || true)"
        say "Python: creating venv $venv (${base:-no python3 on PATH})"
        if [[ -z $base ]] || ! "$base" -m venv "$venv" >&2; then
            # Debian's own python3 ships venv/ensurepip in the python3-venv package.
            rm -rf "$venv"
            [[ -x /usr/bin/python3 ]] || apt_install python3
            /usr/bin/python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
            say "Python: creating venv $venv (/usr/bin/python3)"
            /usr/bin/python3 -m venv "$venv" >&2 || die "python3 -m venv $venv failed"
        fi
    fi
    say "Python: pip install -r ${requirements#"$root"/}"
    timed "$py" -m pip install --disable-pip-version-check -q -r "$requirements" >&2 ||
        die "pip install -r $requirements failed"
    "$py" -c "$modules" || die "the test requirements are still not importable in $venv"
}

# ------------------------------------------------------------------- S3
# moto's standalone server: in memory, any credentials. Its state goes when it stops, so the
# bucket is created whenever it is missing.
s3_bucket_ok() {
    "$venv/bin/python" - "$s3_host" "$s3_port" "$s3_bucket" <<'PY' >&2
import sys, boto3, botocore
host, port, bucket = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
try:
    s3.head_bucket(Bucket=bucket)
except botocore.exceptions.ClientError:
    s3.create_bucket(Bucket=bucket)
PY
}
ensure_s3() {
    if port_open "$s3_host" "$s3_port"; then
        say "S3: something listens on $s3_host:$s3_port, reusing it"
    else
        local log="$root/target/moto-server.log"
        mkdir -p "$root/target"
        say "S3: starting moto_server on $s3_host:$s3_port (log: ${log#"$root"/})"
        nohup "$venv/bin/moto_server" -H "$s3_host" -p "$s3_port" >"$log" 2>&1 &
        local i
        for i in $(seq 1 50); do
            port_open "$s3_host" "$s3_port" && break
            sleep 0.2
        done
        port_open "$s3_host" "$s3_port" || die "moto_server did not start (see $log)"
    fi
    s3_bucket_ok || die "cannot create the bucket $s3_bucket on $s3_host:$s3_port"
}

# ------------------------------------------------------- docker-compose
# Not a service: the checker of compose.yaml (`docker-compose config`) that the test
# command runs. Debian's package is the Python one; no Docker engine is needed for it.
ensure_compose() {
    if have docker-compose || docker compose version >/dev/null 2>&1; then
        return
    fi
    if have apt-get && { [[ $(id -u) -eq 0 ]] || have sudo; }; then
        say "docker-compose: not installed (checks compose.yaml)"
        apt_install docker-compose
    else
        say "docker-compose: not installed and cannot be; compose.yaml will not be checked"
    fi
}

[[ -f $requirements ]] || die "missing $requirements"
ensure_redis
ensure_rabbitmq
ensure_python
ensure_s3
ensure_compose

say "ready. Environment for the tests:"
# Shell-quoted, so that `eval` and scripts/test.sh can read them back.
printf 'AMQP_ADDR=%q\n' "amqp://$amqp_host:$amqp_port/%2f"
printf 'REDIS_URL=%q\n' "redis://$redis_host:$redis_port"
printf 'SLUICE_PYTHON=%q\n' "$venv/bin/python"
printf 'SLUICE_S3_ENDPOINT=%q\n' "http://$s3_host:$s3_port"
printf 'SLUICE_S3_BUCKET=%q\n' "$s3_bucket"

