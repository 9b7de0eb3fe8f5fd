"""The credit-control engine (`payg_service._CreditControlEngine`) that runs every credit-control request,
on SQLite and PostgreSQL: a batch is ONE store transaction with a savepoint per request — a request
that fails or is refused rolls back only its own writes and the others are booked; answers exist
only once the batch's COMMIT is done, and a failed COMMIT fails every request of the batch and
books nothing; a request without its type is answered 5004."""

from __future__ import annotations

from concurrent.futures import Future
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from paygholds import failing_commit, store_held

from meterlink.clock import SimClock
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import payg_service
from meterlink.headend import payg_store as S
from meterlink.v1 import payg_pb2

T0 = datetime(2026, 3, 9, 12, tzinfo=timezone.utc)
POLICY = CC.GrantPolicy(validity=timedelta(hours=6), min_grant_minor=100, max_grant_minor=600,
                        initial_burn_rate_minor_per_h=Decimal(40))
UPDATE = CC.RequestType.UPDATE_REQUEST


@pytest.fixture
def service(payg_url):
    store = S.PaygStore(payg_url)
    for i in (1, 2, 3):
        store.put_account(f"ACC{i}", "GBP", max_balance_minor=100_000)
        store.bind_meter(f"M{i}", f"ACC{i}", T0)
        store.append([L.top_up(f"seed{i}", T0, f"ACC{i}", "SHOP1", 5_000, "GBP", store.vat)])
    svc = payg_service.CreditControlService(store, SimClock(T0), POLICY)      # no registry: no access check
    for i in (1, 2, 3):                                                        # every session open
        assert run(svc, [(request(i, 0), CC.RequestType.INITIAL_REQUEST)])[0].result().result_code == 2001
    yield svc
    store.close()


def request(i: int, n: int, used: int = 0, meter: str | None = None):
    return payg_pb2.CreditControlRequest(
        gateway_id="gw", session_id=f"S{i}", request_number=n, account_id=f"ACC{i}", meter_id=meter or f"M{i}",
        currency="GBP", used=payg_pb2.UsedUnits(used_minor=used, used_wh=used * 40) if used else None)


def run(svc, items) -> list[Future]:
    """One batch, as the engine's thread runs it."""
    batch = [(req, payg_service._InBandCall(None), rtype, Future()) for req, rtype in items]
    svc.engine._process(batch)
    return [f for *_, f in batch]


def credit(store, account: str) -> int:
    return L.customer_credit(list(store.transactions()), account, "GBP")


def test_a_failing_and_a_refused_request_roll_back_only_their_own_writes(service, monkeypatch):
    store = service.store
    real = service.cc.handle

    def handle(req, now):
        out = real(req, now)                        # books the usage, then fails (as a bug would)
        if req.session_id == "S2":
            raise RuntimeError("boom after booking")
        return out
    monkeypatch.setattr(service.cc, "handle", handle)
    commits = store.commits
    ok1, failed, refused, ok3 = run(service, [(request(1, 1, used=100), UPDATE), (request(2, 1, used=200), UPDATE),
                                              (request(2, 1, used=200, meter="M3"), UPDATE),   # M3 is not ACC2's
                                              (request(3, 1, used=300), UPDATE)])
    assert ok1.result().result_code == 2001 and ok3.result().result_code == 2001
    with pytest.raises(RuntimeError, match="boom"):
        failed.result()
    assert refused.result().refusal == payg_service.METER_NOT_BOUND and refused.result().result_code == 5003
    assert (credit(store, "ACC1"), credit(store, "ACC2"), credit(store, "ACC3")) == (4_900, 5_000, 4_700)
    assert store.commits - commits == 1                                     # one COMMIT for the batch
    assert L.totals_by_currency(store.transactions()) == {"GBP": 0} and store.verify_balances() == []


def test_a_failed_commit_fails_every_request_of_the_batch_and_books_nothing(service):
    store = service.store
    with failing_commit(store):
        futures = run(service, [(request(i, 1, used=100), UPDATE) for i in (1, 2, 3)])
    for f in futures:
        with pytest.raises(Exception, match="disk is full"):
            f.result()
    assert [credit(store, f"ACC{i}") for i in (1, 2, 3)] == [5_000] * 3
    again = run(service, [(request(i, 1, used=100), UPDATE) for i in (1, 2, 3)])    # the gateways send them again
    assert [f.result().result_code for f in again] == [2001] * 3
    assert [credit(store, f"ACC{i}") for i in (1, 2, 3)] == [4_900] * 3


def test_a_request_without_its_type_is_answered_5004_and_books_nothing(service):
    answer, = run(service, [(request(1, 1, used=100), None)])
    assert answer.result().result_code == 5004 and "request_type" in answer.result().detail
    assert credit(service.store, "ACC1") == 5_000


def test_a_unary_request_runs_on_its_own_thread_when_nothing_else_is_pending(service):
    engine = service.engine
    first = engine.submit(request(1, 1, used=100), payg_service._InBandCall(None), UPDATE, inline=True)
    assert first.done() and first.result().result_code == 2001 and engine._thread is None    # no hand-over
    with store_held(service.store):               # another writer holds the store: a queued batch waits
        queued = engine.submit(request(2, 1, used=100), payg_service._InBandCall(None), UPDATE)
        behind = engine.submit(request(3, 1, used=100), payg_service._InBandCall(None), UPDATE, inline=True)
        assert not behind.done()                  # something is pending: it queues behind it, in order
    assert queued.result(5).result_code == 2001 and behind.result(5).result_code == 2001
    assert engine.drain(5) and credit(service.store, "ACC3") == 4_900
