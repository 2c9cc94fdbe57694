"""The SDK against a real nats-server, with the JetStream resources provisioned as a node does
(KV ``shoal-jobs``, object store ``shoal-models``, stream ``SHOAL_UPDATES``, a job's
``UPLOADS_<job>`` stream per decision 2) by an admin connection that plays the node: reads of
state, spec and models (the model written by nats-py's own object store, an independent writer),
``ModelNotReady``, the upload path read back as the node reads it, message ids, the headers
counted against ``max_payload``, the duplicate-id rule of decision 3, the upload quota, and
permission violations surfaced at once."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import ml_dtypes
import nats
import numpy as np
import pytest
from nats.js import api

import shoal
from shoal import errors, wire
from shoal.messages import JobPhase, JobSpec, JobState
from shoal.tensors import from_safetensors, to_safetensors

from conftest import VECTORS, NatsServer, run

JOB = "pyjob"


def spec_body(job: str = JOB, **over: Any) -> dict[str, Any]:
    body = json.loads((VECTORS / "specs" / "fedadam.json").read_text())["body"]
    body.update(job=job, **over)
    return body


async def provision(url: str, job: str = JOB, *, upload_quota: int = 1 << 24, spec: dict[str, Any] | None = None) -> nats.NATS:
    """What a node and `shoal job create` set up, done with nats-py as an independent writer."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="KV_shoal-jobs", subjects=["$KV.shoal-jobs.>"], allow_direct=True, allow_rollup_hdrs=True, deny_delete=True, max_msgs_per_subject=1, discard=api.DiscardPolicy.NEW))
    await js.create_object_store("shoal-models")
    await js.add_stream(api.StreamConfig(name="SHOAL_UPDATES", subjects=["shoal.*.update.*"], retention=api.RetentionPolicy.WORK_QUEUE, duplicate_window=600.0))
    await js.add_stream(
        api.StreamConfig(
            name=f"UPLOADS_{job}",
            subjects=[f"shoal.{job}.upload.>"],
            retention=api.RetentionPolicy.LIMITS,
            max_msgs_per_subject=1,
            allow_rollup_hdrs=False,
            deny_purge=False,
            discard=api.DiscardPolicy.NEW,
            max_bytes=upload_quota,
            max_age=24 * 3600.0,
            allow_direct=True,
        )
    )
    await js.publish(f"$KV.shoal-jobs.{job}.spec", JobSpec(spec or spec_body(job)).encode())
    return nc


def state(round_: int, version: int, opened: int = 1, phase: str = "running") -> bytes:
    return JobState(JobPhase(phase), round_, version, opened, opened + 60_000 if opened else 0, 0, None, None).encode()


def params_for(spec: JobSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.uniform(-2, 2, size=t.shape) for t in spec.tensors}


def test_state_spec_and_deleted_keys() -> None:
    server = NatsServer()
    try:

        async def go() -> None:
            admin = await provision(server.url)
            js = admin.jetstream()
            c = await shoal.ShoalClient.connect(server.url, "c1")
            with pytest.raises(shoal.UnknownJob):
                await c.job_state(JOB)
            await js.publish(f"$KV.shoal-jobs.{JOB}.state", state(3, 2))
            s = await c.job_state(JOB)
            assert (s.round, s.model_version, s.is_open) == (3, 2, True)
            spec = await c.job_spec(JOB)
            assert spec.update_kind == "delta" and [t.dtype for t in spec.tensors] == ["F32", "BF16"]
            # A KV delete marker (as `kv.delete` writes it) reads as an unknown job.
            await js.publish(f"$KV.shoal-jobs.{JOB}.state", b"", headers={"KV-Operation": "DEL"})
            with pytest.raises(shoal.UnknownJob):
                await c.job_state(JOB)
            await js.publish(f"$KV.shoal-jobs.{JOB}.state", b"", headers={"KV-Operation": "PURGE"})
            with pytest.raises(shoal.UnknownJob):
                await c.job_state(JOB)
            await c.close()
            await admin.close()

        run(go())
    finally:
        server.stop()


def test_models_written_by_the_nats_object_store_are_read_and_checked() -> None:
    server = NatsServer()
    try:

        async def go() -> None:
            admin = await provision(server.url)
            js = admin.jetstream()
            await js.publish(f"$KV.shoal-jobs.{JOB}.state", state(2, 1))
            spec = JobSpec(spec_body())
            p0, p1 = params_for(spec, 0), params_for(spec, 1)
            obs = await js.object_store("shoal-models")
            # Small chunks: the 2 tensors span several chunks.
            meta = api.ObjectMeta(name=f"{JOB}/0", options=api.ObjectMetaOptions(max_chunk_size=7))
            await obs.put(f"{JOB}/0", to_safetensors(p0, spec.tensors), meta=meta)
            await obs.put(f"{JOB}/1", to_safetensors(p1, spec.tensors))
            c = await shoal.ShoalClient.connect(server.url, "c1")
            got = await c.fetch_model(JOB, 0)
            assert got["w"].dtype == np.float32 and got["b"].dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(got["w"], p0["w"].astype(np.float32))
            np.testing.assert_array_equal(got["b"].view(np.uint16), p0["b"].astype(ml_dtypes.bfloat16).view(np.uint16))
            assert (await c.fetch_model_bytes(JOB, 1)) == to_safetensors(p1, spec.tensors)
            with pytest.raises(shoal.ModelNotReady) as e:
                await c.fetch_model(JOB, 2)
            assert (e.value.version, e.value.committed) == (2, 1)
            # A committed version that is gone is not "not ready".
            await obs.delete(f"{JOB}/0")
            with pytest.raises(shoal.ModelUnavailable):
                await c.fetch_model(JOB, 0)
            await c.close()
            await admin.close()

        run(go())
    finally:
        server.stop()


async def updates(admin: nats.NATS, n: int) -> list[Any]:
    """The messages of SHOAL_UPDATES (sequence order), read by the admin with direct-free gets."""
    js = admin.jetstream()
    out = []
    for seq in range(1, n + 1):
        out.append(await js.get_msg("SHOAL_UPDATES", seq))
    return out


def test_inline_and_upload_paths_as_the_node_reads_them() -> None:
    server = NatsServer()
    try:

        async def go() -> None:
            admin = await provision(server.url, spec=spec_body(inline_limit_bytes=150, chunk_bytes=64))
            js = admin.jetstream()
            await js.publish(f"$KV.shoal-jobs.{JOB}.state", state(1, 0))
            spec = JobSpec(spec_body())
            c = await shoal.ShoalClient.connect(server.url, "c1")
            small = params_for(spec, 3)
            payload = to_safetensors(small, spec.tensors)
            assert len(payload) > 150  # 15 numbers + header: over this spec's inline limit
            r = await c.publish_update(JOB, 1, 0, 10, small)
            assert (r.transport, r.chunks) == ("upload", -(-len(payload) // 64))
            sha = hashlib.sha256(payload).hexdigest()
            (msg,) = await updates(admin, 1)
            h = msg.headers
            assert msg.subject == f"shoal.{JOB}.update.c1" and msg.data in (b"", None)
            assert h["Shoal-Upload-Chunks"] == str(r.chunks) and h["Shoal-Upload-Bytes"] == str(len(payload))
            assert h["Shoal-Digest"] == f"sha256:{sha}" and h["Shoal-Kind"] == "delta"
            expected_id = wire.update_msg_id(JOB, 1, "c1", base_version=0, num_examples=10, kind="delta", transport=f"upload:{r.chunks}:{len(payload)}", payload_sha256_hex=sha)
            assert h["Nats-Msg-Id"] == expected_id == r.msg_id
            # The node's read: chunk i is the last message on <p>.<job>.upload.<client>.<round>.<i>.
            data = b""
            for i in range(r.chunks):
                chunk = await js.get_last_msg(f"UPLOADS_{JOB}", f"shoal.{JOB}.upload.c1.1.{i}")
                assert len(chunk.data) == (64 if i < r.chunks - 1 else len(payload) - 64 * (r.chunks - 1))
                data += chunk.data
            assert data == payload
            # Forcing the upload path for a tiny payload, and an inline one for another client.
            r2 = await c.publish_update(JOB, 1, 0, 11, small, force_upload=True)
            assert r2.transport == "upload" and r2.msg_id != r.msg_id  # num_examples changed the id
            await c.close()
            await admin.close()

        run(go())
    finally:
        server.stop()


def test_headers_count_against_max_payload() -> None:
    """A payload that fits max_payload alone but not with its headers goes through the upload path
    even when a (wrong) spec allows it inline; the connection is never closed by the server."""
    server = NatsServer(max_payload=4096)
    try:

        async def go() -> None:
            admin = await provision(server.url, spec=spec_body(inline_limit_bytes=4096, chunk_bytes=1024, max_update_bytes=10_000))
            await admin.jetstream().publish(f"$KV.shoal-jobs.{JOB}.state", state(1, 0))
            c = await shoal.ShoalClient.connect(server.url, "c1")
            assert c.max_payload == 4096
            spec = await c.job_spec(JOB)
            # Grow the safetensors header's metadata until the file is 4096 - 50 bytes.
            from shoal.tensors import encode_safetensors, _cast

            arrays = [(t.name, t.dtype, _cast(t, params_for(spec, 1)[t.name])) for t in spec.tensors]
            meta = {"pad": ""}
            blob = encode_safetensors(arrays, meta)
            meta["pad"] = "x" * (4096 - 50 - len(blob))
            blob = encode_safetensors(arrays, meta)
            assert 4096 - 57 <= len(blob) <= 4096 - 50
            assert wire.header_block_size(wire.update_headers(msg_id="j" * 40, round_=1, base_version=0, num_examples=1, kind="delta")) > 50
            r = await c.publish_update(JOB, 1, 0, 1, safetensors=blob)
            assert r.transport == "upload"
            assert c.nats.is_connected
            await c.close()
            await admin.close()

        run(go())
    finally:
        server.stop()


def test_identical_retry_is_deduplicated_and_corrected_retry_goes_through() -> None:
    server = NatsServer()
    try:

        async def go() -> None:
            admin = await provision(server.url)
            await admin.jetstream().publish(f"$KV.shoal-jobs.{JOB}.state", state(1, 0))
            c = await shoal.ShoalClient.connect(server.url, "c1")
            spec = await c.job_spec(JOB)
            p = params_for(spec, 5)
            r1 = await c.publish_update(JOB, 1, 0, 0, p)  # num_examples 0: the node would refuse it
            r2 = await c.publish_update(JOB, 1, 0, 0, p)  # identical retry
            assert r2.duplicate_of_own and r2.msg_id == r1.msg_id and r2.stream_seq == r1.stream_seq
            r3 = await c.publish_update(JOB, 1, 0, 5, p)  # corrected header: a new id, stored
            assert not r3.duplicate_of_own and r3.msg_id != r1.msg_id and r3.stream_seq == r1.stream_seq + 1
            r4 = await c.publish_update(JOB, 1, 0, 5, p, force_upload=True)  # the same bytes by another path
            assert r4.msg_id != r3.msg_id and r4.stream_seq == r3.stream_seq + 1
            await c.close()
            await admin.close()

        run(go())
    finally:
        server.stop()


def test_a_squatted_message_id_is_republished_with_a_nonce() -> None:
    """Decision 3: client A publishes first with B's message id; B's SDK sees a duplicate PubAck for
    an id it never sent and publishes again under a fresh nonce, so JetStream stores B's update."""
    server = NatsServer()
    try:

        async def go() -> None:
            admin = await provision(server.url)
            await admin.jetstream().publish(f"$KV.shoal-jobs.{JOB}.state", state(1, 0))
            b = await shoal.ShoalClient.connect(server.url, "b")
            spec = await b.job_spec(JOB)
            p = params_for(spec, 8)
            payload = to_safetensors(p, spec.tensors)
            b_id = wire.update_msg_id(JOB, 1, "b", base_version=0, num_examples=7, kind="delta", transport="inline", payload_sha256_hex=hashlib.sha256(payload).hexdigest())
            a = await nats.connect(server.url)
            ack = await a.jetstream().publish(f"shoal.{JOB}.update.a", b"junk", headers={"Nats-Msg-Id": b_id, "Shoal-Round": "1"})
            assert not ack.duplicate
            r = await b.publish_update(JOB, 1, 0, 7, p)
            assert r.republished and r.msg_id.startswith(b_id + ".") and len(r.msg_id) == len(b_id) + 17
            msgs = await updates(admin, 2)
            assert msgs[1].subject == f"shoal.{JOB}.update.b" and msgs[1].data == payload
            assert msgs[1].headers["Nats-Msg-Id"] == r.msg_id
            # Publishing the very same update again is B's own retry: deduplicated, not republished.
            again = await b.publish_update(JOB, 1, 0, 7, p)
            assert again.duplicate_of_own and again.msg_id == b_id and not again.republished
            await a.close()
            await b.close()
            await admin.close()

        run(go())
    finally:
        server.stop()


def test_a_full_upload_stream_is_reported_as_the_quota() -> None:
    server = NatsServer()
    try:

        async def go() -> None:
            admin = await provision(server.url, upload_quota=150, spec=spec_body(chunk_bytes=128))
            await admin.jetstream().publish(f"$KV.shoal-jobs.{JOB}.state", state(1, 0))
            c = await shoal.ShoalClient.connect(server.url, "c1")
            spec = await c.job_spec(JOB)
            with pytest.raises(shoal.UploadQuotaFull):
                await c.publish_update(JOB, 1, 0, 1, params_for(spec, 1), force_upload=True)
            await c.close()
            await admin.close()

        run(go())
    finally:
        server.stop()


def test_update_over_max_update_bytes_is_refused_before_sending() -> None:
    server = NatsServer()
    try:

        async def go() -> None:
            admin = await provision(server.url, spec=spec_body(max_update_bytes=100))
            c = await shoal.ShoalClient.connect(server.url, "c1")
            spec = await c.job_spec(JOB)
            with pytest.raises(shoal.UpdateTooLarge):
                await c.publish_update(JOB, 1, 0, 1, params_for(spec, 1))
            info = await admin.jetstream().stream_info("SHOAL_UPDATES")
            assert info.state.messages == 0
            await c.close()
            await admin.close()

        run(go())
    finally:
        server.stop()


def permissions_block(job: str, client: str) -> str:
    """A least-privilege user per decision 4 (password auth; the generator's own output is tested
    with the node in test_node.py)."""
    p = "shoal"
    publish = [
        f"{p}.{job}.update.{client}",
        f"{p}.{job}.upload.{client}.>",
        f"{p}.{job}.reward.{client}",
        f"$JS.API.DIRECT.GET.KV_shoal-jobs.$KV.shoal-jobs.{job}.spec",
        f"$JS.API.DIRECT.GET.KV_shoal-jobs.$KV.shoal-jobs.{job}.state",
        "$JS.API.DIRECT.GET.OBJ_shoal-models",
        "$JS.API.DIRECT.GET.OBJ_shoal-models.>",
    ]
    subscribe = [f"_INBOX_{client}.>", f"{p}.{job}.round", f"{p}.{job}.rejected.{client}"]
    q = lambda xs: ", ".join(f'"{x}"' for x in xs)  # noqa: E731
    return (
        "authorization { users = [\n"
        '  { user: "admin", password: "admin-pw" }\n'
        f'  {{ user: "{client}", password: "{client}-pw", permissions: {{ publish: {{ allow: [{q(publish)}] }}, subscribe: {{ allow: [{q(subscribe)}] }} }} }}\n'
        "] }"
    )


def test_least_permissions_work_and_violations_fail_at_once() -> None:
    server = NatsServer(authorization=permissions_block(JOB, "c1"))
    try:

        async def go() -> None:
            admin_url = server.url.replace("nats://", "nats://admin:admin-pw@")
            admin = await provision(admin_url, spec=spec_body(chunk_bytes=64))
            js = admin.jetstream()
            await js.publish(f"$KV.shoal-jobs.{JOB}.state", state(1, 0))
            spec = JobSpec(spec_body())
            obs = await js.object_store("shoal-models")
            await obs.put(f"{JOB}/0", to_safetensors(params_for(spec, 0), spec.tensors))
            await js.publish(f"$KV.shoal-jobs.other.state", state(1, 0))
            with pytest.raises(shoal.AuthenticationFailed):
                await shoal.ShoalClient.connect(server.url, "c1", user="c1", password="c1-pw-wrong")
            c = await shoal.ShoalClient.connect(server.url, "c1", user="c1", password="c1-pw", timings=shoal.Timings(request=30.0))
            # Everything a client does fits its permissions.
            assert (await c.job_state(JOB)).round == 1
            assert (await c.fetch_model(JOB, 0)).keys() == {"w", "b"}
            assert (await c.publish_update(JOB, 1, 0, 3, params_for(spec, 2), force_upload=True)).transport == "upload"
            assert (await c.publish_update(JOB, 1, 0, 4, params_for(spec, 2))).transport == "inline"
            # Another job's state: refused by the server, reported at once (not after the 30 s request time-out).
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(shoal.PermissionDenied) as e:
                await c.job_state("other")
            assert e.value.subject == "$JS.API.DIRECT.GET.KV_shoal-jobs.$KV.shoal-jobs.other.state" and e.value.op == "publish"
            assert loop.time() - t0 < 5
            # Publishing as another client, and listening to another client's notices.
            with pytest.raises(shoal.PermissionDenied) as e:
                await c._guard("publish as c2", c._js_publish(f"shoal.{JOB}.update.c2", b"x", None, "forge"))
            assert e.value.subject == f"shoal.{JOB}.update.c2"
            with pytest.raises(shoal.PermissionDenied) as e:
                await c._guard("subscribe", _subscribe_flush(c, f"shoal.{JOB}.rejected.c2"))
            assert e.value.op == "subscription" and e.value.subject == f"shoal.{JOB}.rejected.c2"
            # The connection survives a violation.
            assert (await c.job_state(JOB)).round == 1
            await c.close()
            # Without the inbox prefix _INBOX_c1 a client cannot get replies: nats-py's default
            # inbox subscription is refused (what the protocol's inbox rule is for).
            refused: list[str] = []

            async def on_error(e: Exception) -> None:
                refused.append(str(e))

            plain = await nats.connect(server.url, user="c1", password="c1-pw", error_cb=on_error)
            with pytest.raises(Exception):
                await plain.request(f"$JS.API.DIRECT.GET.KV_shoal-jobs.$KV.shoal-jobs.{JOB}.state", b"", timeout=2)
            assert any("subscription" in r and "_inbox." in r for r in refused), refused
            await plain.close()
            await admin.close()

        run(go())
    finally:
        server.stop()


async def _subscribe_flush(c: shoal.ShoalClient, subject: str) -> None:
    c._note_subject(subject)
    await c.nats.subscribe(subject)
    await c.nats.flush()
    await asyncio.sleep(5)
