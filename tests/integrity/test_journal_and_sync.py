"""The journal's chain across restarts and pruning, the disk-pressure policy, jittered back-off, and a 7-day
partition healed on a simulated clock: everything arrives, in order, exactly once."""

from __future__ import annotations

import logging
import random
import stat
from datetime import timedelta

import pytest

from meterlink.chain import Event, Tombstone, first_break, hash_of, ChainRecord
from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.journal import Journal
from meterlink.gateway.sync import Backoff, Pusher, load_or_create_key
from meterlink.readings import BILLING_OBIS, Reading

from .conftest import GW, START, Headend, assert_chain_verifies, free_port, readings


def chain_of(journal: Journal) -> list[ChainRecord]:
    return [r.chain_record() for r in journal.records()]


def test_records_get_gap_free_seqs_chained_across_reopening_the_journal(tmp_path):
    j = Journal(tmp_path / "gw.db")
    j.append(readings(5))
    j.close()
    j = Journal(tmp_path / "gw.db")
    j.append(readings(3) + [Event("card.inserted", "M1", START, b"card-7")])
    recs = chain_of(j)
    assert [r.seq for r in recs] == list(range(1, 10)) and first_break(recs) is None
    assert all(r.hash == hash_of(r.chain_record()) for r in j.records())
    assert j.head() == (9, hash_of(recs[-1]))


def test_pruning_acked_records_keeps_the_head_so_the_chain_continues(tmp_path):
    j = Journal(tmp_path / "gw.db")
    first = j.append(readings(6))
    j.mark_acked(4)
    assert j.prune_acked(older_than_ms=None) == 4
    assert [r.seq for r in j.records()] == [5, 6] and j.unacked_count() == 2
    j.mark_acked(6)
    j.prune_acked()
    assert j.depth() == 0
    nxt = j.append(readings(1))
    assert nxt[0].seq == 7 and nxt[0].prev_hash == first[-1].hash


def test_retention_keeps_acked_records_younger_than_the_policy(tmp_path):
    j = Journal(tmp_path / "gw.db")
    j.append(readings(20))            # 10 polls, 15 min apart
    j.mark_acked(20)
    cutoff = START + timedelta(minutes=15 * 5)
    assert j.prune_acked(older_than_ms=int(cutoff.timestamp() * 1000)) == 10
    assert min(r.reading.taken_at for r in j.records()) == cutoff


def test_disk_pressure_drops_acked_then_instantaneous_values_never_an_unacked_billing_register(tmp_path, headend,
                                                                                              key):
    j = Journal(tmp_path / "gw.db")
    j.append(readings(10))
    Pusher(GW, headend.addr, j, key=key).drain()                # 1..10 delivered and acked
    j.append(readings(40, start=START + timedelta(days=1)))     # 11..50 unacked
    j.append([Event("relay.open", "M1", START + timedelta(days=2))])
    j.append(readings(6, start=START + timedelta(days=3)))
    j.append([Reading("M1", "32.7.0", START + timedelta(days=3, minutes=m), 230_000, "mV") for m in range(6)])
    j.append(readings(2, start=START + timedelta(days=4)))
    before = {r.seq: r for r in j.records() if r.seq > 10}
    report = j.relieve_pressure()
    after = j.records()
    assert report.acked_deleted == 10 and j.billing_only
    kept = [r for r in after if not isinstance(r.body, Tombstone)]
    assert all(isinstance(r.body, Event) or r.reading.obis in BILLING_OBIS for r in kept)
    # every unacked billing register and the event are still there, untouched
    assert [r.seq for r in kept] == [s for s, r in before.items()
                                     if isinstance(r.body, Event) or r.body.obis in BILLING_OBIS]
    assert report.pruned == 20 + 3 + 6 + 1
    assert report.tombstones == 20 + 2 + 1 + 1   # the last voltage of day 3 and the six after it: one tombstone
    assert len(after) == len(before) - 6
    assert first_break(chain_of(j), 10, before[11].prev_hash) is None
    # the head-end verifies the pruned chain and holds every billing register exactly once
    Pusher(GW, headend.addr, j, key=key).drain()
    assert j.unacked_count() == 0
    assert_chain_verifies(headend.path, GW)
    billed = headend.repo.readings("M1", "1.8.0")
    assert len(billed) == 5 + 20 + 3 + 1 and len({r.taken_at for r in billed}) == len(billed)


def gateway_config(tmp_path, headend_addr: str):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nid = "{GW}"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = 900\n\n'
                   f'[headend]\naddress = "{headend_addr}"\n')
    return load_config(str(cfg))


def test_the_daemon_raises_the_alarm_and_polls_billing_only_while_the_disk_is_nearly_full(tmp_path, clock,
                                                                                          caplog):
    from meterlink.metrics import GatewayMetrics
    gw = Gateway(gateway_config(tmp_path, f"127.0.0.1:{free_port()}"), clock)
    gw.metrics = GatewayMetrics.create()
    alarm = lambda: gw.metrics.registry.get_sample_value("meterlink_gateway_disk_alarm")
    try:
        gw.journal.append(readings(8))
        gw.disk_usage = lambda path: (1000, 980, 20)               # 2 % free
        with caplog.at_level(logging.ERROR, logger="meterlink.gateway"):
            gw.retention_once()
        assert gw.journal.billing_only and gw.disk_alarm and alarm() == 1
        assert any("ALARM" in r.message and "disk nearly full" in r.message for r in caplog.records)
        gw.disk_usage = lambda path: (1000, 500, 500)              # room again
        gw.retention_once()
        assert not gw.journal.billing_only and not gw.disk_alarm and alarm() == 0
    finally:
        gw.close()


def test_the_signing_key_is_made_on_the_device_readable_by_its_owner_only(tmp_path):
    key = load_or_create_key(tmp_path / "k" / "signing.key")
    mode = stat.S_IMODE((tmp_path / "k" / "signing.key").stat().st_mode)
    assert mode == 0o600
    again = load_or_create_key(tmp_path / "k" / "signing.key")
    assert again.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()


def test_back_off_grows_exponentially_with_full_jitter_up_to_the_cap():
    b = Backoff(base_s=5, cap_s=300, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(12)]
    ceilings = [min(300, 5 * 2 ** i) for i in range(12)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings))
    assert len(set(delays)) == 12                      # jittered, never in lock-step
    assert max(delays[6:]) > 60                       # it does grow
    b.reset()
    assert b.next_delay() <= 5
    assert [Backoff(rng=random.Random(1)).next_delay() for _ in range(2)] == \
        [Backoff(rng=random.Random(1)).next_delay()] * 2    # reproducible with an injected RNG


def test_a_seven_day_partition_heals_and_everything_arrives_in_order_exactly_once(tmp_path, clock, key):
    port = free_port()
    gw = Gateway(gateway_config(tmp_path, f"127.0.0.1:{port}"), clock, rng=random.Random(3))
    gw.keep_acked_days = 30
    he = Headend(tmp_path / "headend.db", clock, port)
    try:
        attempts = tries = 0
        end = START + timedelta(days=7)
        when = START
        while when < end:               # 7 days, head-end unreachable; the daemon wants to push every minute
            clock.set(when)
            if when.minute == 0 and when.hour % 6 == 0:     # six hours of 15-minute polls, journaled
                gw.journal.append([r for q in range(24) for r in readings(
                    4, start=when + timedelta(minutes=15 * q), first_value=((when - START).days * 96 + q) * 10)])
            errors = gw.stats.push_errors
            gw.sync_once()
            tries += 1
            attempts += gw.stats.push_errors - errors
            when += timedelta(minutes=1)
        assert gw.journal.unacked_count() == 7 * 96 * 4
        assert 7 * 24 < attempts < tries / 2                # backed off with jitter, capped at 5 minutes
        assert gw.next_push_at is not None and gw.next_push_at - clock.now() <= timedelta(seconds=300)
        he.start()                                          # the partition heals
        he.trust(GW, gw.key)
        clock.set(gw.next_push_at)
        assert gw.push_due()
        assert gw.sync_once() == 7 * 96 * 4
        assert gw.journal.unacked_count() == 0 and gw.next_push_at is None
        recs = assert_chain_verifies(he.path, GW)
        assert [r.seq for r in recs] == list(range(1, 7 * 96 * 4 + 1))
        taken = [r.body.taken_at for r in recs]
        assert taken == sorted(taken) and taken[-1] == START + timedelta(days=7)  # in order
        assert len(he.repo.readings("M1")) == 7 * 96 * 4    # exactly once
    finally:
        gw.close()
        he.stop()


def test_a_head_end_without_push_stream_is_drained_batch_by_batch_with_push(tmp_path, clock, key, monkeypatch):
    from meterlink.headend.service import GatewaySyncService
    from meterlink.v1 import sync_pb2_grpc
    # an older head-end: the generated servicer's PushStream answers UNIMPLEMENTED
    monkeypatch.setattr(GatewaySyncService, "PushStream", sync_pb2_grpc.GatewaySyncServicer.PushStream)
    old = Headend(tmp_path / "old.db", clock).start()
    try:
        old.trust(GW, key)
        j = Journal(tmp_path / "gw.db")
        j.append(readings(30))
        pusher = Pusher(GW, old.addr, j, batch=7, key=key)
        assert pusher.drain() == 30
        assert pusher._streaming is False and j.unacked_count() == 0
        assert len(old.repo.readings("M1")) == 30
        assert_chain_verifies(old.path, GW)
    finally:
        old.stop()


def test_a_head_end_that_stops_acknowledging_fails_the_drain_after_the_timeout(tmp_path, clock, key, monkeypatch):
    import threading

    import grpc

    from meterlink.errors import DeviceError
    from meterlink.headend.service import GatewaySyncService
    release = threading.Event()

    def stuck(self, request, context, decoded):      # holds the first batch: no ack ever comes
        release.wait(10)
        context.abort(grpc.StatusCode.UNAVAILABLE, "released by the test")   # stores nothing
    monkeypatch.setattr(GatewaySyncService, "_push", stuck)
    he = Headend(tmp_path / "stuck.db", clock).start()
    try:
        he.trust(GW, key)
        j = Journal(tmp_path / "gw.db")
        j.append(readings(12))
        with pytest.raises(DeviceError, match="no ack within 0.5 s"):
            Pusher(GW, he.addr, j, batch=4, key=key, timeout_s=0.5).drain()
        assert j.acked_seq() == 0
    finally:
        release.set()
        he.stop()
