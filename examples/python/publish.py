#!/usr/bin/env python3
"""Publish telemetry straight to Sluice's broker, in the Sluice binding (docs/binding.md).

A third-party producer in about 250 lines: it needs only the broker URL, the namespace and
the partition count. It never declares queues (Sluice's services own the topology); it only
checks, passively, that the telemetry exchange exists.

    pip install -r examples/python/requirements.txt
    python examples/python/publish.py --readings 100000 --tenant demo

Readings are generated for devices ``<device-prefix><i>`` (i in 0..devices) and metrics
``metric-<j>`` (j in 0..metrics), cycling over the (device, metric) pairs in order
``(0,0), (0,1), ..., (1,0), ...``; reading number r is pair ``r mod (devices*metrics)``
and is that pair's reading ``k = r div (devices*metrics)``. Timestamps strictly increase
from reading to reading.

With ``--seed S`` the values are deterministic: ``x = S + i*1000 + j + k``, so after N
readings the last value of device i, metric j is ``S + i*1000 + j + (count - 1)`` where
``count`` is how many readings that pair got. Without it they are a random walk.

The only thing written to stdout is one final JSON line:
``{"published_readings": N, "batches": B}``. Progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
import uuid

import msgpack
import pika
import pika.exceptions

CONTENT_TYPE = "application/vnd.sluice.batch+msgpack"
FORMAT_VERSION = 1
MAX_READINGS_PER_BATCH = 100_000
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a64(text: str) -> int:
    """64-bit FNV-1a of the UTF-8 bytes (binding section 1, device-hash partitioning)."""
    h = FNV_OFFSET
    for byte in text.encode("utf-8"):
        h ^= byte
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Publish telemetry batches to Sluice over AMQP (the Sluice binding v1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--amqp-url",
        default=os.environ.get("AMQP_ADDR", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        help="broker URL (env AMQP_ADDR)",
    )
    p.add_argument(
        "--namespace", default="sluice", help="Sluice namespace (exchange <ns>.telemetry)"
    )
    p.add_argument("--partitions", type=int, default=4, help="partition count of the deployment")
    p.add_argument(
        "--partitioning",
        choices=["round-robin", "device-hash"],
        default="round-robin",
        help="round-robin: batch k goes to partition k mod P; "
        "device-hash: one device per batch, partition fnv1a64(device) mod P",
    )
    p.add_argument("--tenant", default="demo", help="tenant id")
    p.add_argument(
        "--ingress",
        action="store_true",
        help="publish to the tenant's ingress exchange <ns>.ingress.<tenant>: what a broker "
        "user of a tenant with a quota must do (docs/binding.md section 6)",
    )
    p.add_argument("--devices", type=int, default=50, help="number of simulated devices")
    p.add_argument("--device-prefix", default="dev-", help="device names are <prefix><i>")
    p.add_argument("--metrics", type=int, default=2, help="metrics per device (metric-<j>)")
    p.add_argument("--readings", type=int, default=10_000, help="total readings to publish")
    p.add_argument("--batch-size", type=int, default=500, help="readings per batch")
    p.add_argument("--producer", default="py-example", help="producer id (app_id)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="deterministic values x = seed + i*1000 + j + k (see the module docstring)",
    )
    p.add_argument("--retries", type=int, default=5, help="attempts per batch before giving up")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)

    def bad(msg: str) -> None:
        p.error(msg)

    if args.partitions < 1:
        bad("--partitions must be at least 1")
    if args.devices < 1 or args.metrics < 1:
        bad("--devices and --metrics must be at least 1")
    if args.readings < 1:
        bad("--readings must be at least 1")
    if not 1 <= args.batch_size <= MAX_READINGS_PER_BATCH:
        bad(f"--batch-size must be between 1 and {MAX_READINGS_PER_BATCH}")
    if not TENANT_RE.match(args.tenant):
        bad("--tenant must match [a-z0-9][a-z0-9_-]{0,62}")
    if not 1 <= len(args.producer.encode("utf-8")) <= 128:
        bad("--producer must be 1 to 128 bytes")
    if args.retries < 1:
        bad("--retries must be at least 1")
    return args


def readings(args: argparse.Namespace):
    """Yields (device index, metric index, t in ns, value) for every reading, in order."""
    pairs = args.devices * args.metrics
    rng = random.Random()
    walk = [rng.uniform(0.0, 100.0) for _ in range(pairs)]
    last_t = 0
    for r in range(args.readings):
        pair, k = r % pairs, r // pairs
        i, j = divmod(pair, args.metrics)
        # Strictly increasing, so "latest" is well defined for every (device, metric).
        last_t = max(time.time_ns(), last_t + 1)
        if args.seed is not None:
            x = float(args.seed + i * 1000 + j + k)
        else:
            walk[pair] += rng.gauss(0.0, 1.0)
            x = walk[pair]
        yield i, j, last_t, x


class Batch:
    """One batch under construction: the columnar body of binding section 3."""

    def __init__(self) -> None:
        self.devices: list[str] = []
        self.metrics: list[str] = []
        self._device_index: dict[str, int] = {}
        self._metric_index: dict[str, int] = {}
        self.d: list[int] = []
        self.m: list[int] = []
        self.t: list[int] = []
        self.x: list[float] = []

    def __len__(self) -> int:
        return len(self.x)

    def add(self, device: str, metric: str, t: int, x: float) -> None:
        di = self._device_index.get(device)
        if di is None:
            di = self._device_index[device] = len(self.devices)
            self.devices.append(device)
        mi = self._metric_index.get(metric)
        if mi is None:
            mi = self._metric_index[metric] = len(self.metrics)
            self.metrics.append(metric)
        self.d.append(di)
        self.m.append(mi)
        self.t.append(t)
        self.x.append(float(x))

    def encode(self, batch_id: bytes, producer: str, seq: int, tenant: str) -> bytes:
        body = {
            "v": FORMAT_VERSION,
            "id": batch_id,  # bytes -> MessagePack bin (use_bin_type)
            "producer": producer,
            "seq": seq,
            "created": time.time_ns(),
            "tenant": tenant,
            "devices": self.devices,
            "metrics": self.metrics,
            "d": self.d,
            "m": self.m,
            "t": self.t,
            "x": self.x,  # Python floats -> MessagePack float 64
        }
        return msgpack.packb(body, use_bin_type=True)


class Publisher:
    """A confirming publisher that reconnects and retries the same bytes on failure."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.exchange = (
            f"{args.namespace}.ingress.{args.tenant}"
            if args.ingress
            else f"{args.namespace}.telemetry"
        )
        self.params = pika.URLParameters(args.amqp_url)
        # A broker that blocks publishers (memory/disk alarm) for this long counts as a failure.
        self.params.blocked_connection_timeout = 30
        self.connection: pika.BlockingConnection | None = None
        self.channel = None

    def open(self) -> None:
        """(Re)connects, checks the exchange passively and enables publisher confirms."""
        self.close()
        self.connection = pika.BlockingConnection(self.params)
        channel = self.connection.channel()
        channel.exchange_declare(exchange=self.exchange, passive=True)
        channel.confirm_delivery()
        self.channel = channel

    def connect(self) -> None:
        """The first connection: fails with a clear message when Sluice is not there."""
        url = redact(self.args.amqp_url)
        try:
            self.open()
        except pika.exceptions.ChannelClosedByBroker as e:
            self.close()
            raise SystemExit(
                f"publish.py: exchange '{self.exchange}' does not exist on {url} "
                f"({e.reply_code} {e.reply_text}). Sluice's services declare it at start: "
                f"is Sluice running with --namespace {self.args.namespace}?"
            ) from e
        except pika.exceptions.AMQPError as e:
            self.close()
            raise SystemExit(
                f"publish.py: cannot connect to the broker at {url}: {e!r}. "
                f"Is RabbitMQ running (docker compose up, or scripts/services.sh)?"
            ) from e

    def close(self) -> None:
        if self.connection is not None and self.connection.is_open:
            try:
                self.connection.close()
            except pika.exceptions.AMQPError:
                pass
        self.connection = None
        self.channel = None

    def publish(self, body: bytes, batch_id: bytes, partition: int) -> None:
        props = pika.BasicProperties(
            delivery_mode=2,
            content_type=CONTENT_TYPE,
            message_id=str(uuid.UUID(bytes=batch_id)),
            app_id=self.args.producer,
            # The broker user, which RabbitMQ checks: Sluice holds a direct publisher to the
            # tenant its user is listed under (`amqp_users`, docs/binding.md section 6).
            user_id=self.params.credentials.username,
            headers={"sluice-version": FORMAT_VERSION},
        )
        for attempt in range(1, self.args.retries + 1):
            try:
                if self.channel is None or not self.channel.is_open:
                    self.open()
                # With confirms on, this returns once the broker acked; it raises on a nack
                # or, since mandatory=True, when no queue is bound to the routing key.
                self.channel.basic_publish(
                    exchange=self.exchange,
                    routing_key=str(partition),
                    body=body,
                    properties=props,
                    mandatory=True,
                )
                return
            except pika.exceptions.UnroutableError as e:
                error = (
                    f"unroutable: no queue bound to partition {partition} "
                    f"(does Sluice run with --partitions {self.args.partitions}?): {e!r}"
                )
            except pika.exceptions.NackError as e:
                error = f"nacked by the broker: {e!r}"
            except pika.exceptions.AMQPError as e:
                error = f"connection or channel lost: {e!r}"
                self.close()
            if attempt < self.args.retries:
                delay = min(0.1 * 2 ** (attempt - 1), 5.0)
                print(
                    f"publish.py: batch {props.message_id} attempt {attempt} failed ({error}); "
                    f"retrying the same bytes in {delay:.1f}s",
                    file=sys.stderr,
                )
                time.sleep(delay)
        raise SystemExit(
            f"publish.py: batch {props.message_id} not confirmed after {self.args.retries} "
            f"attempts: {error}"
        )


def redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    publisher = Publisher(args)
    publisher.connect()

    seq = 0
    published = 0
    started = time.monotonic()
    last_progress = started

    def send(batch: Batch, device: str | None) -> None:
        nonlocal seq, published, last_progress
        batch_id = uuid.uuid4().bytes
        body = batch.encode(batch_id, args.producer, seq, args.tenant)
        if device is None:
            partition = seq % args.partitions
        else:
            partition = fnv1a64(device) % args.partitions
        publisher.publish(body, batch_id, partition)
        seq += 1
        published += len(batch)
        now = time.monotonic()
        if not args.quiet and now - last_progress >= 1.0:
            rate = published / (now - started)
            print(
                f"publish.py: {published}/{args.readings} readings, {seq} batches, "
                f"{rate:,.0f} readings/s",
                file=sys.stderr,
            )
            last_progress = now

    metrics = [f"metric-{j}" for j in range(args.metrics)]
    devices = [f"{args.device_prefix}{i}" for i in range(args.devices)]
    if args.partitioning == "round-robin":
        batch = Batch()
        for i, j, t, x in readings(args):
            batch.add(devices[i], metrics[j], t, x)
            if len(batch) == args.batch_size:
                send(batch, None)
                batch = Batch()
        if len(batch):
            send(batch, None)
    else:
        pending: dict[int, Batch] = {}
        for i, j, t, x in readings(args):
            batch = pending.setdefault(i, Batch())
            batch.add(devices[i], metrics[j], t, x)
            if len(batch) == args.batch_size:
                send(pending.pop(i), devices[i])
        for i in sorted(pending):
            send(pending[i], devices[i])

    publisher.close()
    if not args.quiet:
        elapsed = time.monotonic() - started
        print(
            f"publish.py: done, {published} readings in {seq} batches in {elapsed:.2f}s",
            file=sys.stderr,
        )
    print(json.dumps({"published_readings": published, "batches": seq}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
