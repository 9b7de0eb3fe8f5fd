"""CreditControl.Session: a gateway's credit-control requests on one long-lived stream over real
mutual TLS on loopback — answered like the unary calls, refusals in-band, requests that arrive
while a batch runs committed together, and the gateway's `CreditControlLink` falling back to the
unary calls on a head-end without the stream, resetting a stream that does not answer and closing
one that is idle."""

from __future__ import annotations

import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from meterlink.gateway.enrol import secure_channel
from meterlink.gateway.payg_sync import CreditControlLink
from meterlink.clock import SimClock
from meterlink.headend import ledger as L
from meterlink.headend import payg_service
from meterlink.headend.gatewayauth import refusal_of
from meterlink.headend.service import make_server
from meterlink.headend.store import open_repository
from meterlink.metrics import HeadendMetrics
from meterlink.v1 import payg_pb2, payg_pb2_grpc

from .processes import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: paygholds
from paygholds import store_held  # noqa: E402

INITIAL, UPDATE = payg_pb2.REQUEST_TYPE_INITIAL, payg_pb2.REQUEST_TYPE_UPDATE


def request(n: int, rtype=None, meter="MTR-1", account="ACC1", session="gw-a/MTR-1/1", **used):
    return payg_pb2.CreditControlRequest(
        gateway_id="gw-a", session_id=session, request_number=n, account_id=account, meter_id=meter,
        currency="GBP", used=payg_pb2.UsedUnits(**used) if used else None,
        request_type=rtype if rtype is not None else (INITIAL if n == 0 else UPDATE))


@pytest.fixture
def gateway(payg_headend, tmp_path):
    hd = payg_headend
    identity = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1", "MTR-2"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", 5_000, "GBP", hd.store.vat)])
    channel = secure_channel(hd.address, identity)
    link = CreditControlLink(channel, idle_s=60)          # open until closed: no test depends on the 2 s default
    yield hd, link, channel
    link.close()
    channel.close()


def test_stream_requests_are_answered_like_the_unary_calls_and_booked_once(gateway):
    hd, link, channel = gateway
    assert link.exchange(request(0), 5).result_code == 2001
    upd = request(1, used_minor=120, used_wh=4000)
    a1 = link.exchange(upd, 5)
    a2 = link.exchange(upd, 5)                           # a retransmission: the stored answer, nothing booked
    assert a1 == a2 and a1.result_code == 2001 and a1.granted.amount_minor > 0
    assert link.exchange(request(1, used_minor=1, used_wh=1), 5).result_code == 5004    # same number, other content
    # the unary call answers the same request identically: one store, one idempotency
    assert payg_pb2_grpc.CreditControlStub(channel).Update(upd, timeout=5) == a1
    assert L.customer_credit(list(hd.store.transactions()), "ACC1", "GBP") == 5_000 - 120
    assert link.streaming and hd.services.credit_control.engine.requests == 5     # unary calls run there too


def test_a_refusal_is_answered_in_band_and_the_stream_goes_on(gateway):
    hd, link, _ = gateway
    stream = link._open()
    refused = link.submit(request(0, meter="MTR-9", session="gw-a/MTR-9/1")).result(5)    # not provisioned
    assert refused.refusal == "ACCESS_REFUSAL_METER_NOT_PROVISIONED" and refused.result_code == 5003
    unbound = link.submit(request(0, meter="MTR-2", session="gw-a/MTR-2/1")).result(5)    # provisioned, not bound
    assert unbound.refusal == "METER_NOT_BOUND" and "not a PAYG meter" in unbound.detail
    assert link.submit(request(0)).result(5).result_code == 2001                          # same stream, still open
    assert link._open() is stream and hd.services.credit_control.engine.requests == 3
    # the gateway's own path raises it as a unary refusal would be
    with pytest.raises(grpc.RpcError) as err:
        link.exchange(request(0, meter="MTR-9", session="gw-a/MTR-9/1"), 5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refusal_of(err.value) == "ACCESS_REFUSAL_METER_NOT_PROVISIONED"
    assert [t.business_key for t in hd.store.transactions()] == ["seed"]        # a grant is no posting


def test_a_request_without_its_type_is_answered_5004_naming_the_field(gateway):
    _, link, _ = gateway
    answer = link.submit(request(0, rtype=payg_pb2.REQUEST_TYPE_UNSPECIFIED)).result(5)
    assert answer.result_code == 5004 and "request_type" in answer.detail


def test_requests_arriving_while_a_batch_runs_commit_together_in_the_next(gateway):
    hd, link, _ = gateway
    engine = hd.services.credit_control.engine
    for i in range(2, 7):
        hd.store.bind_meter(f"MTR-{i}", f"ACC{i}", hd.clock.now())
        hd.store.put_account(f"ACC{i}", "GBP", max_balance_minor=100_000)
    hd.registry.provision("gw-a", [f"MTR-{i}" for i in range(2, 7)], [], hd.clock.now())
    assert link.exchange(request(0), 5).result_code == 2001       # the engine is running
    batches, commits = engine.batches, hd.store.commits
    with store_held(hd.store):                                      # another writer holds the store
        first = link.submit(request(0, meter="MTR-2", account="ACC2", session="gw-a/MTR-2/1"))
        # the server received it and the engine took it (it waits for the store)
        wait_until(lambda: engine._unanswered == 1 and engine._queue.qsize() == 0)
        assert engine._unanswered == 1 and engine._queue.qsize() == 0
        rest = [link.submit(request(0, meter=f"MTR-{i}", account=f"ACC{i}", session=f"gw-a/MTR-{i}/1"))
                for i in range(3, 7)]
        wait_until(lambda: engine._queue.qsize() == 4)
        assert engine._queue.qsize() == 4
        assert not first.done()                                     # not answered before its COMMIT
    answers = [f.result(5) for f in [first, *rest]]
    assert [a.session_id for a in answers] == [f"gw-a/MTR-{i}/1" for i in range(2, 7)]    # in order
    assert all(a.result_code in (2001, 4012) and not a.refusal for a in answers)
    assert engine.batches - batches == 2 and engine.requests >= 6   # the first alone, then the four together
    # at most: the holder's group, the first's and the four's (one per request would be 6)
    assert hd.store.commits - commits <= 3


class _OldHeadend:
    """A head-end from before CreditControl.Session: the unary methods only (gRPC answers
    UNIMPLEMENTED for the stream), each answering 2001 and counting its calls."""

    def __init__(self):
        self.calls = []
        self.server = grpc.server(futures.ThreadPoolExecutor(2))

        def unary(name):
            def handle(req, context):
                self.calls.append((name, req.request_number))
                return payg_pb2.CreditControlAnswer(session_id=req.session_id, request_number=req.request_number,
                                                    result_code=2001)
            return grpc.unary_unary_rpc_method_handler(
                handle, request_deserializer=payg_pb2.CreditControlRequest.FromString,
                response_serializer=payg_pb2.CreditControlAnswer.SerializeToString)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "meterlink.v1.CreditControl", {n: unary(n) for n in ("Reserve", "Update", "Terminate")}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def test_a_head_end_without_the_stream_gets_the_unary_calls():
    old = _OldHeadend()
    channel = grpc.insecure_channel(f"127.0.0.1:{old.port}")
    link = CreditControlLink(channel)
    try:
        assert link.exchange(request(0), 5).result_code == 2001
        assert not link.streaming
        assert link.exchange(request(1, used_minor=5), 5).result_code == 2001
        assert link.exchange(request(2, rtype=payg_pb2.REQUEST_TYPE_TERMINATION), 5).result_code == 2001
        assert old.calls == [("Reserve", 0), ("Update", 1), ("Terminate", 2)]     # each once
    finally:
        link.close()
        channel.close()
        old.server.stop(None)


def test_a_stream_that_does_not_answer_is_reset_and_an_idle_one_closed():
    answer_now = threading.Event()
    opened = []

    def session(requests, context):
        opened.append(1)
        for req in requests:
            if not answer_now.wait(10):
                return
            yield payg_pb2.CreditControlAnswer(session_id=req.session_id, request_number=req.request_number,
                                               result_code=2001)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("meterlink.v1.CreditControl", {
        "Session": grpc.stream_stream_rpc_method_handler(
            session, request_deserializer=payg_pb2.CreditControlRequest.FromString,
            response_serializer=payg_pb2.CreditControlAnswer.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    link = CreditControlLink(channel, idle_s=0.05)
    try:
        with pytest.raises(grpc.RpcError) as err:
            link.exchange(request(0), 0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert link._stream is None and link.streaming          # reset, the stream is still the way
        answer_now.set()
        assert link.exchange(request(0), 5).result_code == 2001   # a new stream
        assert len(opened) == 2
        wait_until(lambda: link._stream is None, timeout=5)       # idle: closed
        assert link.exchange(request(1), 5).result_code == 2001
        assert len(opened) == 3
    finally:
        answer_now.set()
        link.close()
        channel.close()
        server.stop(None)


def test_stopping_the_server_waits_for_the_engine_to_answer_what_it_was_handed(gateway):
    """`stop_server` drains the engine after the handlers returned, so the store is never closed
    under a batch still running."""
    hd, link, _ = gateway
    engine = hd.services.credit_control.engine
    assert engine.drain in hd.servers.server.drains
    with store_held(hd.store):
        answer = link.submit(request(0))
        wait_until(lambda: engine._queue.qsize() == 0 and engine._unanswered == 1)
        assert engine.drain(timeout=0.1) is False                  # its batch waits for the store
    assert engine.drain(timeout=5) is True and answer.result(5).result_code == 2001


def test_open_streams_and_engine_work_are_prometheus_metrics(gateway, tmp_path):
    from prometheus_client import CollectorRegistry

    hd, link, _ = gateway
    registry = CollectorRegistry()
    registry.register(payg_service._CreditControlCollector(hd.services.credit_control))
    value = registry.get_sample_value
    assert value("meterlink_headend_payg_credit_control_streams") == 0
    assert link.exchange(request(0), 5).result_code == 2001
    assert value("meterlink_headend_payg_credit_control_streams") == 1            # the link's stream is open
    assert value("meterlink_headend_payg_credit_control_requests_total") == 1
    assert value("meterlink_headend_payg_credit_control_batches_total") == 1
    assert value("meterlink_headend_payg_credit_control_unanswered") == 0
    link.close()
    wait_until(lambda: value("meterlink_headend_payg_credit_control_streams") == 0, timeout=5)
    assert value("meterlink_headend_payg_credit_control_streams") == 0
    # serve --metrics-listen: the PAYG services register them on the server's metrics registry
    metrics = HeadendMetrics.create()
    repo = open_repository(f"sqlite:///{tmp_path / 'other.db'}")
    server, _ = make_server(repo, SimClock(hd.clock.now()), "127.0.0.1:0", metrics=metrics)
    payg_service.add_to_server(server, hd.store, hd.clock)
    assert metrics.registry.get_sample_value("meterlink_headend_payg_credit_control_requests_total") == 0
    repo.close()


def test_with_every_stream_taken_a_gateway_gets_unary_calls_not_a_wait(gateway, payg_headend):
    """Each open stream holds a server worker thread: the servicer refuses a stream beyond its limit
    (RESOURCE_EXHAUSTED, before reading anything) and the gateway sends that request, and the next
    ones for a while, as unary calls."""
    hd, link, channel = gateway
    cc = hd.services.credit_control
    assert cc.max_streams == 8 - 2                                  # make_secure_servers: 8 workers
    cc.max_streams = 1
    assert link.exchange(request(0), 5).result_code == 2001        # the one stream
    other = CreditControlLink(channel)                             # another gateway process, say
    try:
        requests_before = cc.engine.requests
        assert other.exchange(request(1, used_minor=50, used_wh=2000), 5).result_code == 2001
        assert other._stream is None and other._unary_until > 0    # unary, and so for a while
        assert other.exchange(request(2, used_minor=50, used_wh=2000), 5).result_code == 2001
        assert cc.streams_open == 1 and cc.engine.requests == requests_before + 2
        assert L.customer_credit(list(hd.store.transactions()), "ACC1", "GBP") == 5_000 - 100
    finally:
        other.close()
