"""Prometheus metrics for both daemons (prometheus-client); each daemon owns its own registry.

Names follow Prometheus conventions (`_total` counters, `_seconds` histograms). Serving is opt-in
(gateway: `[metrics] listen = "127.0.0.1:9108"` or `run --metrics-listen`; head-end: `serve
--metrics-listen`); nothing here reads clocks or touches meters.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry
    readings: Counter
    bus_errors: Counter
    journal_depth: Gauge | None            # None: exposed by `watch` at scrape time instead
    unacked: Gauge | None
    push_latency: Histogram
    pushed: Counter
    disk_alarm: Gauge | None = None      # 1 while the journal's disk is nearly full (billing-only polling)
    push_refusals: Counter | None = None
    push_failures: Counter | None = None   # pushes that failed: head-end unreachable, access refused, refused batch
    config_pulls: Counter | None = None    # configuration pulls by result (ok, failed, refused)

    @classmethod
    def create(cls) -> "GatewayMetrics":
        r = CollectorRegistry()
        return cls(
            registry=r,
            readings=Counter("meterlink_gateway_readings_total", "Readings taken from meters", ["bus"], registry=r),
            bus_errors=Counter("meterlink_gateway_failed_reads_total", "Scheduled meter reads that failed "
                               "(after the transport gave up), by bus", ["bus"], registry=r),
            journal_depth=None, unacked=None,     # read at scrape time (watch)
            push_latency=Histogram("meterlink_gateway_push_seconds", "Wall time of one push to the head-end "
                                   "(every unacked record, in batches), successful or not",
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r),
            pushed=Counter("meterlink_gateway_pushed_records_total", "Records acknowledged by the head-end",
                           registry=r),
            disk_alarm=Gauge("meterlink_gateway_disk_alarm", "1 while the journal disk is nearly full and only "
                             "billing registers are polled", registry=r),
            push_refusals=Counter("meterlink_gateway_push_refusals_total", "Batches the head-end refused, by reason",
                                  ["reason"], registry=r),
            push_failures=Counter("meterlink_gateway_push_failures_total", "Pushes that failed (head-end "
                                  "unreachable, access refused over mutual TLS, or a refused batch)", registry=r),
            config_pulls=Counter("meterlink_gateway_config_pulls_total", "Signed configuration pulls, by result "
                                 "(ok, failed: unreachable, refused: forged or replayed delta)", ["result"],
                                 registry=r),
        )


    def watch(self, snapshot: Callable[[], "GatewaySnapshot"]) -> None:
        """Expose what the daemon's parts count themselves, read at scrape time from `snapshot()`:
        bus transport counters, P1 telegram refusals, MQTT drops, journal depth and unacked records."""
        self.registry.register(_SnapshotCollector(snapshot))


@dataclass(frozen=True)
class GatewaySnapshot:
    """Counters of the daemon's parts at one instant (built by the daemon; pure data)."""

    buses: tuple = ()          # (bus name, transport BusCounters)
    p1: tuple = ()             # (port, P1Counters)
    mqtt: object | None = None   # MqttStats or None
    journal_records: int = 0
    unacked_records: int = 0


class _SnapshotCollector:
    def __init__(self, snapshot: Callable[[], GatewaySnapshot]) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        s = self.snapshot()
        requests = CounterMetricFamily("meterlink_gateway_bus_requests", "Modbus requests sent, by bus", labels=["bus"])
        errors = CounterMetricFamily("meterlink_gateway_bus_errors", "Modbus requests that failed on the bus, by "
                                     "kind (timeout, crc, exception)", labels=["bus", "kind"])
        for name, c in s.buses:
            requests.add_metric([name], c.requests)
            for kind, value in (("timeout", c.timeouts), ("crc", c.crc_errors), ("exception", c.exceptions)):
                errors.add_metric([name, kind], value)
        yield requests
        yield errors
        telegrams = CounterMetricFamily("meterlink_gateway_p1_telegrams", "DSMR P1 telegrams accepted, by port",
                                        labels=["port"])
        refused = CounterMetricFamily("meterlink_gateway_p1_refused_telegrams", "DSMR P1 telegrams refused, by "
                                      "port and reason (crc, truncated, malformed)", labels=["port", "reason"])
        for port, c in s.p1:
            telegrams.add_metric([port], c.telegrams)
            for reason, value in (("crc", c.crc_errors), ("truncated", c.truncated), ("malformed", c.malformed)):
                refused.add_metric([port, reason], value)
        yield telegrams
        yield refused
        if s.mqtt is not None:
            yield CounterMetricFamily("meterlink_gateway_mqtt_published", "Readings handed to the MQTT broker",
                                      value=s.mqtt.sent)
            yield CounterMetricFamily("meterlink_gateway_mqtt_dropped", "Readings dropped because the MQTT queue "
                                      "was full (broker down or slow)", value=s.mqtt.dropped)
        yield GaugeMetricFamily("meterlink_gateway_journal_records", "Records held in the journal",
                                value=s.journal_records)
        yield GaugeMetricFamily("meterlink_gateway_unacked_records", "Journal records not yet acknowledged",
                                value=s.unacked_records)


@dataclass
class HeadendMetrics:
    registry: CollectorRegistry
    batches: Counter
    records: Counter
    duplicates: Counter
    refusals: Counter
    ingest_latency: Histogram

    @classmethod
    def create(cls) -> "HeadendMetrics":
        r = CollectorRegistry()
        return cls(
            registry=r,
            batches=Counter("meterlink_headend_batches_total", "Push batches received", registry=r),
            records=Counter("meterlink_headend_records_total", "Records newly committed", registry=r),
            duplicates=Counter("meterlink_headend_duplicate_records_total", "Re-sent records acknowledged again",
                               registry=r),
            refusals=Counter("meterlink_headend_refused_batches_total", "Batches refused, by reason code",
                             ["reason"], registry=r),
            ingest_latency=Histogram("meterlink_headend_ingest_seconds", "Time to verify and commit a batch",
                                     registry=r),
        )


def serve_metrics(registry: CollectorRegistry, listen: str) -> int:
    """Start the /metrics HTTP endpoint on HOST:PORT (port 0 picks one); returns the port."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    return server.server_port
