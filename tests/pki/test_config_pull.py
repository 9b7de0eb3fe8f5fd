"""Signed configuration deltas: pulled over mutual TLS, verified before use, forged and replayed ones refused."""

from __future__ import annotations

import json

import pytest

from meterlink import pki
from meterlink.gateway.configpull import (ConfigDeltaRefused, ConfigPuller, ConfigState, apply_delta, load_state,
                                          verify_delta)
from meterlink.gateway.enrol import enroll, secure_channel
from meterlink.headend.configpub import build_delta, publish_blacklist, publish_tariff
from meterlink.v1 import config_pb2

TARIFF = '[tariff]\nname = "flat"\n'


@pytest.fixture
def gateway(headend, tmp_path):
    code = headend.registry.add("gw-0001", headend.clock.now())
    identity = enroll(headend.enrol_address, code, tmp_path / "gw", ca_fingerprint=headend.keys.ca_fingerprint)
    channel = secure_channel(headend.address, identity)
    yield identity, ConfigPuller.for_identity(channel, identity)
    channel.close()


def test_config_is_pulled_verified_and_applied_and_the_version_is_kept(headend, gateway):
    identity, puller = gateway
    now = headend.clock.now()
    headend.registry.provision("gw-0001", ["MTR-1", "MTR-2"], [], now)
    publish_tariff(headend.registry, "flat", TARIFF, now)
    headend.registry.add("gw-other", now)
    headend.registry.provision("gw-other", ["MTR-9"], [], now)            # not for this gateway
    state = puller.pull_once()
    assert state.meters == ("MTR-1", "MTR-2") and state.tariffs == {"flat": TARIFF}
    assert load_state(identity.state_dir / "config-state.json") == state
    headend.registry.provision("gw-0001", [], ["MTR-1"], now)
    publish_blacklist(headend.registry, ["CARD-7"], now)
    later = puller.pull_once()
    assert later.version > state.version
    assert later.meters == ("MTR-2",) and later.blacklist == ("CARD-7",)
    assert puller.pull_once() == later                                     # nothing new: unchanged


def test_a_delta_signed_by_another_key_is_refused_and_nothing_is_applied(headend, gateway):
    identity, puller = gateway
    headend.registry.provision("gw-0001", ["MTR-1"], [], headend.clock.now())
    forged = build_delta(headend.registry, "gw-0001", 0, headend.clock.now(), pki.new_signing_key())
    with pytest.raises(ConfigDeltaRefused, match="not by the head-end's key"):
        puller.apply(forged)
    forged.key_id = pki.key_id(headend.keys.signing_public)               # claim the right key id
    with pytest.raises(ConfigDeltaRefused, match="forged configuration delta refused"):
        puller.apply(forged)
    assert puller.state() == ConfigState()


def test_a_delta_altered_after_signing_is_refused(headend, gateway):
    identity, puller = gateway
    headend.registry.provision("gw-0001", ["MTR-1"], [], headend.clock.now())
    genuine = build_delta(headend.registry, "gw-0001", 0, headend.clock.now(), headend.keys.signing_key)
    altered = config_pb2.SignedConfigDelta()
    altered.CopyFrom(genuine)
    altered.payload = genuine.payload.replace(b"MTR-1", b"MTR-X")
    with pytest.raises(ConfigDeltaRefused, match="signature does not verify"):
        puller.apply(altered)
    assert puller.apply(genuine).meters == ("MTR-1",)


def test_a_replayed_older_delta_is_refused(headend, gateway):
    identity, puller = gateway
    now = headend.clock.now()
    headend.registry.provision("gw-0001", ["MTR-1"], [], now)
    first = build_delta(headend.registry, "gw-0001", 0, now, headend.keys.signing_key)
    puller.apply(first)
    headend.registry.provision("gw-0001", [], ["MTR-1"], now)
    puller.pull_once()
    with pytest.raises(ConfigDeltaRefused, match="is a replay"):
        puller.apply(first)                     # would re-add the withdrawn meter
    assert puller.state().meters == ()


def test_a_delta_for_another_gateway_or_out_of_order_is_refused(headend):
    key = headend.keys.signing_key
    now = headend.clock.now()
    headend.registry.add("gw-a", now)
    headend.registry.provision("gw-a", ["MTR-1"], [], now)
    pub = headend.keys.signing_public
    with pytest.raises(ConfigDeltaRefused, match="for gateway 'gw-a', not 'gw-b'"):
        verify_delta(build_delta(headend.registry, "gw-a", 0, now, key), pub, "gw-b", 0)
    v1 = verify_delta(build_delta(headend.registry, "gw-a", 0, now, key), pub, "gw-a", 0).version
    headend.registry.provision("gw-a", ["MTR-2"], [], now)
    headend.registry.provision("gw-a", ["MTR-3"], [], now)
    with pytest.raises(ConfigDeltaRefused, match="out of order"):
        # applied v1, offered a delta starting after the change v1+1: that change would be skipped
        verify_delta(build_delta(headend.registry, "gw-a", v1 + 1, now, key), pub, "gw-a", v1)


def test_unknown_change_kinds_are_refused_not_skipped(headend):
    now = headend.clock.now()
    headend.registry.add("gw-a", now)
    headend.registry.publish("gw-a", "relay.force_open", {"meter": "MTR-1"}, now)
    delta = verify_delta(build_delta(headend.registry, "gw-a", 0, now, headend.keys.signing_key),
                         headend.keys.signing_public, "gw-a", 0)
    with pytest.raises(ConfigDeltaRefused, match="unknown kind 'relay.force_open'"):
        apply_delta(ConfigState(), delta)


def test_the_payload_is_canonical_json_naming_since_and_version(headend):
    now = headend.clock.now()
    headend.registry.add("gw-a", now)
    headend.registry.provision("gw-a", ["MTR-1"], [], now)
    payload = build_delta(headend.registry, "gw-a", 0, now, headend.keys.signing_key).payload
    doc = json.loads(payload)
    assert payload == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["since"] == 0 and doc["version"] >= 1 and doc["changes"][0]["kind"] == "meter.add"


def test_any_single_byte_change_to_a_signed_delta_is_refused(headend):
    from hypothesis import given, settings, strategies as st
    now = headend.clock.now()
    headend.registry.add("gw-a", now)
    headend.registry.provision("gw-a", ["MTR-1", "MTR-2"], [], now)
    publish_tariff(headend.registry, "flat", TARIFF, now)
    genuine = build_delta(headend.registry, "gw-a", 0, now, headend.keys.signing_key)
    pub = headend.keys.signing_public
    assert verify_delta(genuine, pub, "gw-a", 0).version >= 3

    @settings(max_examples=150, deadline=None)
    @given(field=st.sampled_from(["payload", "signature"]), index=st.integers(min_value=0),
           flip=st.integers(min_value=1, max_value=255))
    def altered_is_refused(field, index, flip):
        data = bytearray(getattr(genuine, field))
        data[index % len(data)] ^= flip
        forged = config_pb2.SignedConfigDelta()
        forged.CopyFrom(genuine)
        setattr(forged, field, bytes(data))
        with pytest.raises(ConfigDeltaRefused):
            verify_delta(forged, pub, "gw-a", 0)

    altered_is_refused()
