"""Pure parts of the contract: message ids (against the example of docs/protocol.md, computed
independently), subjects, header sizes, and the numpy adapter's casts."""

from __future__ import annotations

import hashlib

import ml_dtypes
import numpy as np
import pytest
import safetensors

from shoal import wire
from shoal.messages import TensorSpec
from shoal.tensors import TensorMismatch, apply_delta, delta, encode_safetensors, from_safetensors, to_safetensors

EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def test_message_id_matches_the_documented_example() -> None:
    msg_id = wire.update_msg_id("mnist", 3, "c1", base_version=2, num_examples=600, kind="parameters", transport="inline", payload_sha256_hex=EMPTY_SHA)
    assert msg_id == "mnist.3.c1.196037ecbc8a1080"
    material = f"shoal-msg-id/1\n3\n2\n600\nparameters\ninline\n{EMPTY_SHA}\n".encode()
    assert msg_id.endswith(hashlib.sha256(material).hexdigest()[:16])


def test_message_id_changes_with_everything_that_matters() -> None:
    base = dict(base_version=2, num_examples=600, kind="parameters", transport="inline", payload_sha256_hex=EMPTY_SHA)
    ids = {wire.update_msg_id("j", 3, "c", **base)}
    for change in ({"num_examples": 5}, {"base_version": 1}, {"kind": "delta"}, {"transport": wire.transport_upload(1, 0)}, {"payload_sha256_hex": hashlib.sha256(b"x").hexdigest()}):
        ids.add(wire.update_msg_id("j", 3, "c", **{**base, **change}))
    ids.add(wire.update_msg_id("j", 4, "c", **base))
    assert len(ids) == 7
    with_nonce = wire.update_msg_id("j", 3, "c", nonce="abc123", **base)
    assert with_nonce == wire.update_msg_id("j", 3, "c", **base) + ".abc123"
    for bad in ("", "a-b", "x" * 17):
        with pytest.raises(ValueError):
            wire.update_msg_id("j", 3, "c", nonce=bad, **base)
    n = wire.fresh_nonce()
    assert len(n) == 16 and n.isalnum()


def test_subjects_and_ids() -> None:
    s = wire.Subjects()
    assert s.update("mnist", "c-1") == "shoal.mnist.update.c-1"
    assert s.upload_chunk("mnist", "c-1", 3, 0) == "shoal.mnist.upload.c-1.3.0"
    assert wire.kv_direct_get_subject("shoal-jobs", "mnist.state") == "$JS.API.DIRECT.GET.KV_shoal-jobs.$KV.shoal-jobs.mnist.state"
    assert wire.object_meta_subject("shoal-models", "m/0") == "$O.shoal-models.M.bS8w"  # padded base64url (as the node wrote it)
    assert wire.object_meta_subject("shoal-models", "mnist/3") == "$O.shoal-models.M.bW5pc3QvMw=="
    assert wire.inbox_prefix("c1") == "_INBOX_c1"
    for bad in ("", "a.b", "a b", "x" * 65, "é"):
        with pytest.raises(wire.InvalidId):
            wire.check_id("id", bad)
    with pytest.raises(wire.InvalidId):
        wire.Subjects("a.b")


def test_header_block_size_is_the_wire_size() -> None:
    h = wire.update_headers(msg_id="j.1.c.0123456789abcdef", round_=1, base_version=0, num_examples=5, kind="delta")
    text = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    assert wire.header_block_size(h) == len(text.encode())
    # The largest headers Shoal sends with 64-byte ids stay far under the 4096 allowance.
    big = wire.update_headers(msg_id=f"{'j' * 64}.{2**64 - 1}.{'c' * 64}.0123456789abcdef.{'n' * 16}", round_=2**64 - 1, base_version=2**64 - 1, num_examples=2**64 - 1, kind="parameters", upload=(2**64 - 1, 2**64 - 1, "f" * 64))
    assert wire.header_block_size(big) < 600
    assert wire.chunk_count(1, 64) == 1 and wire.chunk_count(64, 64) == 1 and wire.chunk_count(65, 64) == 2


TENSORS = (TensorSpec("w", "F32", (2, 3)), TensorSpec("b", "BF16", (3,)), TensorSpec("n", "I64", ()), TensorSpec("u", "U8", (2,), "max"))


def test_numpy_adapter_round_trips_with_manifest_dtypes() -> None:
    params = {"w": np.arange(6, dtype=np.float64).reshape(2, 3) / 3, "b": [0.1, 1.0, 1e30], "n": 2**53 + 1, "u": np.array([0, 255])}
    data = to_safetensors(params, TENSORS)
    # A standard reader sees the manifest's dtypes and shapes.
    seen = {name: (info["dtype"], info["shape"]) for name, info in safetensors.deserialize(data)}
    assert seen == {"w": ("F32", [2, 3]), "b": ("BF16", [3]), "n": ("I64", []), "u": ("U8", [2])}
    back = from_safetensors(data, TENSORS)
    assert back["w"].dtype == np.float32 and np.array_equal(back["w"], params["w"].astype(np.float32))
    assert back["b"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(back["b"], np.array(params["b"]).astype(ml_dtypes.bfloat16))
    assert back["n"].shape == () and int(back["n"]) == 2**53 + 1  # exact, never through a float
    assert back["u"].tolist() == [0, 255]


def test_numpy_adapter_refuses_what_does_not_fit() -> None:
    ok = {"w": np.zeros((2, 3)), "b": np.zeros(3), "n": 1, "u": np.zeros(2)}
    for bad, why in (
        ({**ok, "w": np.zeros((3, 2))}, "shape"),
        ({**ok, "n": 1.5}, "non-integer"),
        ({**ok, "u": np.array([256, 0])}, "outside"),
        ({**ok, "u": np.array([-1.0, 0])}, "outside"),
        ({k: v for k, v in ok.items() if k != "b"}, "missing"),
        ({**ok, "extra": np.zeros(1)}, "not in the manifest"),
    ):
        with pytest.raises(TensorMismatch, match=why):
            to_safetensors(bad, TENSORS)
    data = encode_safetensors([("w", "F64", np.zeros((2, 3)))])
    with pytest.raises(TensorMismatch):
        from_safetensors(data, TENSORS[:1])


def test_deltas_are_exact_for_integers_and_rounded_once_for_floats() -> None:
    base = {"w": np.full((2, 3), 0.1, np.float32), "b": np.ones(3, ml_dtypes.bfloat16), "n": np.array(2**62, np.int64), "u": np.array([3, 250], np.uint8)}
    new = {"w": np.full((2, 3), 0.3, np.float32), "b": np.full(3, 1.5, ml_dtypes.bfloat16), "n": np.array(2**62 + 3, np.int64), "u": np.array([5, 255], np.uint8)}
    d = delta(new, base, TENSORS)
    assert d["w"].dtype == np.float32 and np.array_equal(d["w"], np.float32(np.float64(np.float32(0.3)) - np.float64(np.float32(0.1))) * np.ones((2, 3), np.float32))
    assert int(d["n"]) == 3 and d["u"].tolist() == [2, 5]
    back = apply_delta(base, d, TENSORS)
    assert int(back["n"]) == 2**62 + 3 and back["u"].tolist() == [5, 255]
    with pytest.raises(TensorMismatch):
        delta({**new, "u": np.array([0, 0], np.uint8)}, base, TENSORS)  # -3 does not fit U8
