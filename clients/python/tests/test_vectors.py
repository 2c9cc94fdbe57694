"""The golden vectors of proto/vectors/ decode and re-encode byte for byte with the SDK's msgpack
encoder, from the bytes and from the hand-written JSON (named fields in Rust's order, floats as
float 64, absent optionals as nil)."""

from __future__ import annotations

import dataclasses
import json

import msgpack
import pytest

from shoal import messages as m
from shoal.wire import DecodeError, decode_envelope, encode_envelope

from conftest import VECTORS

MESSAGES = sorted((VECTORS / "messages").glob("*.msgpack"))
SPECS = sorted(p for p in (VECTORS / "specs").glob("*.msgpack"))


def typed_roundtrip(name: str, body: object) -> object:
    """Decodes ``body`` into the SDK's typed value for its vector family and back to wire form."""
    if name.startswith("job-state-"):
        return m.JobState.from_wire(body).to_wire()
    if name.startswith(("round-", "job-ended-")):
        return m.round_event_to_wire(m.round_event_from_wire(body))
    if name.startswith("reject-notice"):
        return m.RejectNotice.from_wire(body).to_wire()
    if name == "lease":
        return m.canonical(m.LEASE_SCHEMA, body)
    raise AssertionError(f"no type for vector {name}")


def test_every_vector_family_is_covered() -> None:
    names = {p.stem for p in MESSAGES}
    assert len(MESSAGES) >= 12 and len(SPECS) >= 11
    assert {"job-state-new", "round-opened", "reject-notice", "job-ended-failed"} <= names


@pytest.mark.parametrize("path", MESSAGES, ids=lambda p: p.stem)
def test_message_vectors_reencode_byte_for_byte(path) -> None:
    data = path.read_bytes()
    body = decode_envelope(path.stem, data)
    # From the bytes: typed value and back.
    assert encode_envelope(typed_roundtrip(path.stem, body)) == data
    # From the hand-written JSON (key order of the JSON is irrelevant: canonical order is the schema's).
    doc = json.loads(path.with_suffix(".json").read_text())
    assert doc["v"] == 1
    assert encode_envelope(typed_roundtrip(path.stem, doc["body"])) == data


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_vectors_reencode_byte_for_byte(path) -> None:
    data = path.read_bytes()
    spec = m.JobSpec.decode(data)
    assert spec.encode() == data
    # The stored JSON is written with sorted keys: the schema restores Rust's field order.
    doc = json.loads(path.with_suffix(".json").read_text())
    assert m.JobSpec(doc["body"]).encode() == data


def test_typed_values_match_the_vectors() -> None:
    s = m.JobState.decode((VECTORS / "messages" / "job-state-committed.msgpack").read_bytes())
    assert s.phase == m.JobPhase("running") and s.round == 4 and s.model_version == 3 and s.is_open
    assert s.last_outcome == m.Committed(version=3, clients=20, total_weight=12000.5)
    f = m.JobState.decode((VECTORS / "messages" / "job-state-failed.msgpack").read_bytes())
    assert f.phase == m.JobPhase("failed", "5 rounds in a row committed nothing") and not f.is_open
    assert f.last_outcome == m.QuorumNotMet(accepted=3, min_clients=15)
    e = m.decode_round_event((VECTORS / "messages" / "round-closed-aggregation-failed.msgpack").read_bytes())
    assert e == m.RoundClosed("mnist", 6, m.AggregationFailed("total weight 0 is not positive (0 updates folded)", "zero_total_weight"))
    n = m.RejectNotice.decode((VECTORS / "messages" / "reject-notice-no-round.msgpack").read_bytes())
    assert (n.round, n.reason) == (None, "malformed_headers")
    spec = m.JobSpec.decode((VECTORS / "specs" / "readme-job.msgpack").read_bytes())
    assert [t.name for t in spec.tensors] == ["fc.weight", "fc.bias", "bn.num_batches_tracked"]
    assert spec.tensor("bn.num_batches_tracked") == m.TensorSpec("bn.num_batches_tracked", "I64", (), "max")
    # Default max_update_bytes: data bytes + 64 KiB + per tensor 256 + 6 per name byte.
    data = 10 * 784 * 4 + 10 * 4 + 8
    assert spec.max_update_bytes == data + 65536 + 3 * 256 + 6 * (len("fc.weight") + len("fc.bias") + len("bn.num_batches_tracked"))


def test_encoding_rules_the_vectors_rely_on() -> None:
    # Floats are float 64 even when integral, integers use their smallest form, str is str8/fixstr.
    body = {"outcome": "committed", "version": 3, "clients": 20, "total_weight": 1.0}
    packed = encode_envelope(m.outcome_to_wire(m.outcome_from_wire(body)))
    assert b"\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00" in packed
    assert msgpack.unpackb(packed)["body"]["version"] == 3
    # A hand-written spec with an integer where a float belongs encodes as Rust does (f64).
    raw = json.loads((VECTORS / "specs" / "fedbuff.json").read_text())["body"]
    raw["strategy"]["server_lr"] = 1
    assert m.JobSpec(raw).encode() == (VECTORS / "specs" / "fedbuff.msgpack").read_bytes()


def test_new_phases_and_unknown_fields_decode() -> None:
    state = m.JobState.decode((VECTORS / "messages" / "job-state-new.msgpack").read_bytes())
    cancelled = m.JobState(**{**state.__dict__, "phase": m.JobPhase("cancelled", "deleted by the operator")})
    again = m.JobState.decode(cancelled.encode())
    assert again.phase == m.JobPhase("cancelled", "deleted by the operator") and not again.phase.running
    body = {**state.to_wire(), "a_later_field": [1, 2]}
    later = m.JobState.from_wire(body)
    assert encode_envelope(later.to_wire()) == encode_envelope(body)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01\x02garbage", encode_envelope({"phase": {"phase": "running"}}), msgpack.packb({"v": 2, "body": {}}), msgpack.packb([1, 2])],
)
def test_bad_envelopes_are_refused_with_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        m.JobState.decode(data)


def test_commit_record_lists_stream_sequences() -> None:
    """docs/protocol.md 5.1: a client finds its update's stream sequence in ``last_commit.applied``
    (sorted inclusive ranges) of the round the record names."""
    from shoal.client import _listing

    state = m.JobState.decode((VECTORS / "messages" / "job-state-committed.msgpack").read_bytes())
    assert [_listing(state, s) for s in (1, 3, 5, 6, 9, 10)] == [(3, True), (3, True), (3, True), (3, False), (3, True), (3, False)]
    assert _listing(state, None) is None and _listing(state, 0) is None
    new = m.JobState.decode((VECTORS / "messages" / "job-state-new.msgpack").read_bytes())
    assert _listing(new, 1) is None


def test_what_a_waiting_client_concludes_from_the_commit_record() -> None:
    """The pure decision behind ``wait_for_outcome`` (docs/protocol.md 5.1, 9.2, 13): listed,
    refused (sync), followed into the next buffer (asynchronous), or unknown when the state
    describes a later close."""
    from shoal.client import _after_close

    state = m.JobState.decode((VECTORS / "messages" / "job-state-committed.msgpack").read_bytes())
    assert state.last_commit["round"] == 3
    for asynchronous in (False, True):
        assert _after_close(state, 3, 4, asynchronous=asynchronous) == ("listed", 3)
        assert _after_close(state, 2, 4, asynchronous=asynchronous) == ("listed", 3)
        assert _after_close(state, 2, 7, asynchronous=asynchronous) == ("unknown", 2)
        assert _after_close(state, 3, None, asynchronous=asynchronous) == ("unknown", 3)
    assert _after_close(state, 3, 7, asynchronous=False) == ("refused", 3)
    assert _after_close(state, 3, 7, asynchronous=True) == ("follow", 4)
    ended = dataclasses.replace(state, phase=m.JobPhase("finished"))
    assert _after_close(ended, 3, 7, asynchronous=True) == ("refused", 3)
