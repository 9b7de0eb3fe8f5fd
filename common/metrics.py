"""Prometheus metrics for both daemons (prometheus-client); each daemon owns its own registry.

Names follow Prometheus conventions (`_total` counters, `_seconds` histograms). Serving is opt-in
(`[metrics] listen = "127.0.0.1:9101"`); nothing here reads clocks or touches meters.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry
    readings: Counter
    bus_errors: Counter
    journal_depth: Gauge
    unacked: Gauge
    push_latency: Histogram
    pushed: Counter
    disk_alarm: Gauge | None = None      # 1 while the journal's disk is nearly full (billing-only polling)
    push_refusals: Counter | None = None

    @classmethod
    def create(cls) -> "GatewayMetrics":
        r = CollectorRegistry()
        return cls(
            registry=r,
            readings=Counter("meterlink_gateway_readings_total", "Readings taken from meters", ["bus"], registry=r),
            bus_errors=Counter("meterlink_gateway_bus_errors_total", "Failed meter reads by kind",
                               ["bus", "kind"], registry=r),
            journal_depth=Gauge("meterlink_gateway_journal_records", "Records held in the journal", registry=r),
            unacked=Gauge("meterlink_gateway_unacked_records", "Journal records not yet acknowledged", registry=r),
            push_latency=Histogram("meterlink_gateway_push_seconds", "Round trip of one push batch",
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r),
            pushed=Counter("meterlink_gateway_pushed_records_total", "Records acknowledged by the head-end",
                           registry=r),
            disk_alarm=Gauge("meterlink_gateway_disk_alarm", "1 while the journal disk is nearly full and only "
                             "billing registers are polled", registry=r),
            push_refusals=Counter("meterlink_gateway_push_refusals_total", "Batches the head-end refused, by reason",
                                  ["reason"], registry=r),
        )


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
