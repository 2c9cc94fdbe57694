"""The SDK against a real nats-server and a real `shoal node`: committed models equal independent
float64 oracles (FedAvg over parameters with f32, bf16 and integer tensors; a delta job with
FedAdam; FedBuff with stale updates at the exact staleness bound), every rejection reason that one
node can be made to send, the squatted message id of decision 3, ModelNotReady, and a round with
Python clients and the Rust client (`shoal client`) side by side."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import nats
import numpy as np
import pytest

import shoal
from shoal import errors, wire
from shoal.tensors import encode_safetensors, to_safetensors

from conftest import NatsServer, Node, create_job, run, shoal_bin
from oracle import BF16, FedAdam, assert_f32_close, bf16_nearest, polynomial_staleness, round_half_even, weighted_mean

TIMEOUT = 60.0


def job_spec(job: str, tensors: list[tuple[str, str, list[int], str]], *, cohort: int, min_clients: int | None = None, rounds: int = 1, deadline_ms: int = 60_000, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "job": job,
        "manifest": {"tensors": [{"name": n, "dtype": d, "shape": s, "policy": p} for n, d, s, p in tensors]},
        "round_policy": {"mode": "sync", "cohort_size": cohort, "min_clients": min_clients or cohort, "deadline_ms": deadline_ms},
        "rounds": rounds,
    }
    spec.update(extra)
    return spec


def random_params(spec: shoal.JobSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in spec.tensors:
        if t.is_float:
            out[t.name] = rng.uniform(-2, 2, size=t.shape).astype(shoal.tensors.NUMPY_DTYPES[t.dtype])
        else:
            out[t.name] = rng.integers(-1000, 1000, size=t.shape).astype(shoal.tensors.NUMPY_DTYPES[t.dtype])
    return out


async def clients(url: str, *ids: str, **kw: Any) -> list[shoal.ShoalClient]:
    return [await shoal.ShoalClient.connect(url, i, **kw) for i in ids]


async def close(*cs: shoal.ShoalClient) -> None:
    for c in cs:
        await c.close()


def test_fedavg_parameters_match_the_f64_oracle(cluster) -> None:
    server, _ = cluster
    job = "py-fedavg"
    create_job(server.url, job_spec(job, [("w", "F32", [3, 5], "mean"), ("b", "BF16", [7], "mean"), ("n", "I64", [4], "mean"), ("cnt", "I64", [], "max")], cohort=3))

    async def go() -> None:
        cs = await clients(server.url, "a", "b", "c")
        state = await cs[0].wait_for_open_round(job, 1, timeout=TIMEOUT)
        spec = await cs[0].job_spec(job)
        with pytest.raises(shoal.ModelNotReady):
            await cs[0].fetch_model(job, 1)
        sent = [random_params(spec, s) for s in (1, 2, 3)]
        weights = [10, 20, 35]
        for c, p, n in zip(cs, sent, weights):
            await c.publish_update(job, state.round, state.model_version, n, p)
        results = await asyncio.gather(*(c.wait_for_outcome(job, state.round, timeout=TIMEOUT) for c in cs))
        assert all(r.committed and r.version == 1 for r in results), results
        assert results[0].outcome == shoal.Committed(1, 3, float(sum(weights)))
        model = await cs[1].fetch_model(job, 1)
        assert_f32_close(model["w"], weighted_mean([p["w"] for p in sent], weights))
        oracle_b = bf16_nearest(weighted_mean([p["b"].astype(np.float64) for p in sent], weights))
        assert model["b"].dtype == BF16 and np.array_equal(model["b"].view(np.uint16), oracle_b.view(np.uint16))
        assert model["n"].dtype == np.int64 and np.array_equal(model["n"], round_half_even(weighted_mean([p["n"] for p in sent], weights)))
        assert model["cnt"] == max(int(p["cnt"]) for p in sent)
        await close(*cs)

    run(go())


def test_delta_job_with_fedadam_matches_the_formulas(cluster) -> None:
    """FedAvg over deltas (η_s = 1) then FedAdam: the aggregate is rounded to the tensor dtype
    before the optimizer step (f32 and bf16), the step's result rounded again; integer and
    statistic tensors skip the optimizer."""
    server, _ = cluster
    job = "py-fedadam"
    tensors = [("w", "F32", [6], "mean"), ("h", "BF16", [5], "mean"), ("k", "I64", [2], "mean"), ("s", "F32", [2], "statistic")]
    opt = {"name": "fedadam", "lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 0.001, "bias_correction": "flower"}
    spec_json = job_spec(job, tensors, cohort=2, rounds=2, update_kind="delta", server_optimizer=opt)
    rng = np.random.default_rng(7)
    g = {"w": rng.uniform(-1, 1, 6).astype(np.float32), "h": rng.uniform(-1, 1, 5).astype(BF16), "k": np.array([10, -7], np.int64), "s": np.array([0.5, 2.0], np.float32)}
    create_job(server.url, spec_json, initial=encode_safetensors([("w", "F32", g["w"]), ("h", "BF16", g["h"]), ("k", "I64", g["k"]), ("s", "F32", g["s"])]))
    adam = FedAdam(0.05, 0.9, 0.99, 0.001)
    adam_h = FedAdam(0.05, 0.9, 0.99, 0.001)  # the optimizer's moments are per tensor

    async def go() -> None:
        cs = await clients(server.url, "a", "b")
        current = dict(g)
        for round_ in (1, 2):
            state = await cs[0].wait_for_open_round(job, round_, timeout=TIMEOUT)
            base = await cs[0].fetch_model(job, state.model_version)
            np.testing.assert_array_equal(base["w"], current["w"])
            deltas = [
                {"w": rng.normal(0, 0.3, 6).astype(np.float32), "h": rng.normal(0, 0.3, 5).astype(BF16), "k": rng.integers(-5, 6, 2).astype(np.int64), "s": rng.normal(0, 0.1, 2).astype(np.float32)}
                for _ in cs
            ]
            ns = [3, 5]
            for c, d, n in zip(cs, deltas, ns):
                await c.publish_update(job, state.round, state.model_version, n, d)
            res = await asyncio.gather(*(c.wait_for_outcome(job, state.round, timeout=TIMEOUT) for c in cs))
            assert all(r.committed for r in res)
            model = await cs[0].fetch_model(job, state.model_version + 1)
            # w: aggregate rounded to f32, then Adam from the global model.
            agg = (current["w"].astype(np.float64) + weighted_mean([d["w"] for d in deltas], ns)).astype(np.float32)
            expected_w = adam.step(current["w"], agg)
            assert_f32_close(model["w"], expected_w)
            # h: the same in bfloat16, correctly rounded twice (aggregate, then the step).
            agg_h = bf16_nearest(current["h"].astype(np.float64) + weighted_mean([d["h"].astype(np.float64) for d in deltas], ns))
            expected_h = bf16_nearest(adam_h.step(current["h"].astype(np.float64), agg_h.astype(np.float64)))
            assert model["h"].dtype == BF16 and np.array_equal(model["h"].view(np.uint16), expected_h.view(np.uint16)), (model["h"], expected_h)
            # k: integer mean tensor: global + weighted mean delta, rounded half to even, no optimizer.
            expected_k = round_half_even(current["k"].astype(np.float64) + weighted_mean([d["k"] for d in deltas], ns))
            assert np.array_equal(model["k"], expected_k)
            # s: statistic: the weighted mean of the clients' values (base + mean delta), no optimizer.
            assert_f32_close(model["s"], current["s"].astype(np.float64) + weighted_mean([d["s"] for d in deltas], ns))
            current = {k: model[k] for k in model}
        await close(*cs)

    run(go())


def test_fedbuff_weights_stale_updates_and_refuses_beyond_max_staleness(cluster) -> None:
    server, _ = cluster
    job = "py-fedbuff"
    strategy = {"name": "fedbuff", "buffer_size": 2, "staleness": {"kind": "polynomial", "exponent": 0.5}, "normalisation": "by_buffer_size", "example_weight": "num_examples", "server_lr": 1.0}
    spec_json = {
        "job": job,
        "manifest": {"tensors": [{"name": "w", "dtype": "F32", "shape": [5]}, {"name": "h", "dtype": "BF16", "shape": [3]}, {"name": "k", "dtype": "I64", "shape": [2]}]},
        "strategy": strategy,
        "round_policy": {"mode": "buffered", "max_wait_ms": 60_000, "max_staleness": 2},
        "update_kind": "delta",
        "rounds": 4,
    }
    create_job(server.url, spec_json)
    rng = np.random.default_rng(11)

    async def go() -> None:
        a, b, c, d = await clients(server.url, "fa", "fb", "fc", "fd")
        versions = {0: {"w": np.zeros(5), "h": np.zeros(3), "k": np.zeros(2)}}

        def random_delta() -> dict[str, np.ndarray]:
            return {"w": rng.normal(0, 1, 5).astype(np.float32), "h": rng.normal(0, 1, 3).astype(BF16), "k": rng.integers(-40, 41, 2).astype(np.int64)}

        async def buffer(updates: list[tuple[shoal.ShoalClient, int, int]]) -> None:
            """One buffer: each (client, base version, num_examples) sends a random delta, for the
            round of its base version (a client publishes for the round it started in: for a
            stale base that round is closed, and the update goes into the open buffer)."""
            state = await a.wait_for_open_round(job, timeout=TIMEOUT)
            current = state.model_version
            sent = []
            for cl, base, n in updates:
                delta = random_delta()
                await cl.publish_update(job, base + 1, base, n, delta)
                sent.append((delta, n * polynomial_staleness(current - base, 0.5)))
            res = await asyncio.gather(*(cl.wait_for_outcome(job, base + 1, timeout=TIMEOUT) for cl, base, _ in updates))
            # Each result is the buffer the update went into, listed in its commit record.
            assert all(r.committed and r.version == current + 1 and r.round == state.round and r.included for r in res), [(r.round, r.outcome, r.included, r.state.round, r.state.last_commit) for r in res]
            # by_buffer_size: K = 2; the sum in float64, rounded once to each tensor's dtype.
            oracle = {k: versions[current][k] + sum(w * dl[k].astype(np.float64) for dl, w in sent) / 2 for k in ("w", "h", "k")}
            model = await a.fetch_model(job, current + 1)
            assert_f32_close(model["w"], oracle["w"])
            assert model["h"].dtype == BF16 and np.array_equal(model["h"].view(np.uint16), bf16_nearest(oracle["h"]).view(np.uint16)), (model["h"], oracle["h"])
            assert model["k"].dtype == np.int64 and np.array_equal(model["k"], round_half_even(oracle["k"])), (model["k"], oracle["k"])
            versions[current + 1] = {k: model[k].astype(np.float64) for k in model}

        await buffer([(a, 0, 10), (b, 0, 30)])  # v1, staleness 0
        await buffer([(a, 1, 10), (b, 0, 30)])  # v2, b one version behind
        await buffer([(a, 2, 10), (c, 0, 20)])  # v3, c exactly max_staleness = 2 behind: accepted
        state = await a.wait_for_open_round(job, timeout=TIMEOUT)
        await d.publish_update(job, state.round, 0, 5, random_delta())
        with pytest.raises(errors.LateUpdate) as e:
            await d.wait_for_outcome(job, state.round, timeout=TIMEOUT)  # 3 behind
        assert "3 versions behind" in e.value.detail
        await buffer([(a, 3, 10), (b, 3, 30)])  # v4: the job finishes
        assert (await a.job_state(job)).phase == shoal.JobPhase("finished")
        await close(a, b, c, d)

    run(go())


async def expect(c: shoal.ShoalClient, job: str, round_: int, cls: type[errors.UpdateRejected]) -> errors.UpdateRejected:
    with pytest.raises(cls) as e:
        await c.wait_for_outcome(job, round_, timeout=TIMEOUT)
    assert e.value.reason == cls.reason and e.value.detail
    return e.value


def test_every_rejection_reason_a_node_sends(cluster) -> None:
    server, _ = cluster
    job = "py-rej"
    create_job(server.url, job_spec(job, [("w", "F32", [4], "mean")], cohort=50, min_clients=1, rounds=2, deadline_ms=600_000, max_num_examples=1000))

    async def go() -> None:
        ids = [f"r{i}" for i in range(20)]
        cs = dict(zip(ids, await clients(server.url, *ids)))
        for c in cs.values():
            await c._watch(job)  # raw publishes below bypass publish_update's subscribe-first
        state = await cs["r0"].wait_for_open_round(job, 1, timeout=TIMEOUT)
        r, v = state.round, state.model_version
        good = {"w": np.ones(4, np.float32)}
        spec = await cs["r0"].job_spec(job)
        cases: list[tuple[str, Any, type[errors.UpdateRejected]]] = []

        async def pub(cid: str, *args: Any, **kw: Any) -> None:
            await cs[cid].publish_update(job, *args, **kw)

        await pub("r1", r, v + 3, 5, good)
        cases.append(("r1", r, errors.WrongBaseVersion))
        await pub("r2", r + 2, v, 5, good)
        cases.append(("r2", r + 2, errors.WrongRound))
        await pub("r3", r, v, 0, good)
        cases.append(("r3", r, errors.InvalidWeight))
        await pub("r4", r, v, 1001, good)
        cases.append(("r4", r, errors.InvalidWeight))
        await pub("r5", r, v, 5, safetensors=encode_safetensors([("w", "F32", np.ones(5, np.float32))]))
        cases.append(("r5", r, errors.SchemaMismatch))
        await pub("r6", r, v, 5, {"w": np.array([1, np.nan, 0, 0], np.float32)})
        cases.append(("r6", r, errors.NonFinite))
        await pub("r7", r, v, 5, safetensors=b"\x10\x00\x00\x00\x00\x00\x00\x00not safetensors!")
        cases.append(("r7", r, errors.Malformed))
        await pub("r8", r, v, 5, safetensors=encode_safetensors([("w", "F32", np.ones(4, np.float32)), ("x", "F32", np.ones(1, np.float32))]))
        cases.append(("r8", r, errors.TooManyTensors))
        big = encode_safetensors([("w", "F32", np.ones(4, np.float32))], {"pad": "x" * (spec.max_update_bytes + 10)})
        await pub("r9", r, v, 5, safetensors=big, check_limits=False)
        cases.append(("r9", r, errors.PayloadTooLarge))
        await pub("r10", r, v, 5, good, kind="parameters" if spec.update_kind == "delta" else "delta")
        cases.append(("r10", r, errors.SchemaMismatch))
        # A second, different update in the same round.
        await pub("r11", r, v, 5, good)
        await pub("r11", r, v, 6, good)
        cases.append(("r11", r, errors.Duplicate))
        # Headers the SDK never sends wrong, sent raw on the client's own connection.
        c12 = cs["r12"]
        await c12._watch(job)
        await c12.nats.jetstream().publish(f"shoal.{job}.update.r12", to_safetensors(good, spec.tensors), headers={"Shoal-Base-Version": "0", "Shoal-Num-Examples": "5"})
        cases.append(("r12", r, errors.MalformedHeaders))
        for cid, rnd, cls in cases:
            await expect(cs[cid], job, rnd, cls)
        # The retired object-store path, and uploads that do not add up (the node reads the chunks).
        c13 = cs["r13"]
        obj = {"Shoal-Round": str(r), "Shoal-Base-Version": "0", "Shoal-Num-Examples": "5", "Shoal-Object": f"{job}/{r}/r13", "Shoal-Digest": "sha256:" + "0" * 64}
        await c13.nats.jetstream().publish(f"shoal.{job}.update.r13", b"", headers=obj)
        await expect(c13, job, r, errors.MalformedHeaders)
        payload = to_safetensors(good, spec.tensors)
        sha = hashlib.sha256(payload).hexdigest()

        async def upload(cid: str, chunks: list[bytes], declared_chunks: int, declared_bytes: int, digest: str) -> None:
            c = cs[cid]
            js = c.nats.jetstream()
            for i, part in enumerate(chunks):
                await js.publish(f"shoal.{job}.upload.{cid}.{r}.{i}", part)
            msg_id = wire.update_msg_id(job, r, cid, base_version=0, num_examples=5, kind="parameters", transport=wire.transport_upload(declared_chunks, declared_bytes), payload_sha256_hex=digest)
            h = wire.update_headers(msg_id=msg_id, round_=r, base_version=0, num_examples=5, kind="parameters", upload=(declared_chunks, declared_bytes, digest))
            await js.publish(f"shoal.{job}.update.{cid}", b"", headers=h)

        # The job's chunk_bytes is far above this payload: it is one chunk.
        await upload("r14", [payload], 1, len(payload), hashlib.sha256(b"other").hexdigest())
        await expect(cs["r14"], job, r, errors.DigestMismatch)
        await upload("r15", [], 1, len(payload), sha)  # the chunk never published
        await expect(cs["r15"], job, r, errors.ObjectUnavailable)
        half = len(payload) // 2
        await upload("r16", [payload[:half], payload[half:]], 2, len(payload), sha)  # 2 chunks where 1 is due
        await expect(cs["r16"], job, r, errors.Malformed)
        # Another client's message id (decision 3): unauthorized, not folded.
        other = wire.update_msg_id(job, r, "r18", base_version=0, num_examples=5, kind="parameters", transport="inline", payload_sha256_hex=sha)
        await cs["r17"].nats.jetstream().publish(f"shoal.{job}.update.r17", payload, headers=wire.update_headers(msg_id=other, round_=r, base_version=0, num_examples=5, kind="parameters"))
        await expect(cs["r17"], job, r, errors.Unauthorized)
        # An unknown job: the notice goes to that job's subject.
        nc = cs["r19"].nats
        sub = await nc.subscribe("shoal.nojob.rejected.r19")
        await nc.jetstream().publish("shoal.nojob.update.r19", payload, headers={"Shoal-Round": "1", "Shoal-Base-Version": "0", "Shoal-Num-Examples": "1"})
        notice = shoal.RejectNotice.decode((await sub.next_msg(timeout=TIMEOUT)).data)
        assert notice.reason == "unknown_job" and isinstance(errors.rejection(notice), errors.UnknownJobRejected)
        await close(*cs.values())

    run(go())


def test_late_update_job_not_running_and_cohort_full(cluster) -> None:
    server, _ = cluster
    create_job(server.url, job_spec("py-late", [("w", "F32", [2], "mean")], cohort=1, rounds=2))
    create_job(server.url, job_spec("py-full", [("w", "F32", [2], "mean")], cohort=3, min_clients=1, deadline_ms=600_000, max_clients_per_round=1))

    async def go() -> None:
        a, b = await clients(server.url, "la", "lb")
        p = {"w": np.ones(2, np.float32)}
        s = await a.wait_for_open_round("py-late", 1, timeout=TIMEOUT)
        await a.publish_update("py-late", 1, 0, 1, p)
        assert (await a.wait_for_outcome("py-late", 1, timeout=TIMEOUT)).version == 1
        await b.publish_update("py-late", 1, 0, 1, p)  # round 1 closed
        await expect(b, "py-late", 1, errors.LateUpdate)
        await a.wait_for_open_round("py-late", 2, timeout=TIMEOUT)
        await a.publish_update("py-late", 2, 1, 1, p)
        r = await a.wait_for_outcome("py-late", 2, timeout=TIMEOUT)
        assert r.version == 2 and r.state.phase.name == "finished"
        await b.publish_update("py-late", 2, 1, 2, p)
        await expect(b, "py-late", 2, errors.JobNotRunning)
        with pytest.raises(shoal.JobEnded):
            await a.wait_for_open_round("py-late", 3, timeout=TIMEOUT)
        del s
        s = await a.wait_for_open_round("py-full", 1, timeout=TIMEOUT)
        await a.publish_update("py-full", 1, 0, 1, p)
        await b.publish_update("py-full", 1, 0, 1, p)
        await expect(b, "py-full", 1, errors.CohortFull)
        await close(a, b)

    run(go())


def test_corrected_retries_reach_the_node(cluster) -> None:
    """Defect 3 of issue 13 end to end: a retry that only corrects a header (num_examples 0 -> 5,
    the same bytes) and a retry of an update refused inline as too large through the upload path
    (the same bytes) both get new message ids, so JetStream stores them and the round commits
    them; a byte-identical retry is deduplicated and answered by the first refusal."""
    server, _ = cluster
    job = "py-retry"
    # inline_limit_bytes far below max_payload: a client that ignored it would be refused.
    create_job(server.url, job_spec(job, [("w", "F32", [64], "mean")], cohort=2, inline_limit_bytes=200))

    async def go() -> None:
        a, b = await clients(server.url, "ra", "rb")
        await a.wait_for_open_round(job, 1, timeout=TIMEOUT)
        spec = await a.job_spec(job)
        assert spec.inline_limit_bytes == 200
        pa = {"w": np.full(64, 1.0, np.float32)}
        pb = {"w": np.full(64, 4.0, np.float32)}
        # a: num_examples 0 is refused; the identical retry is dropped by JetStream and answered by
        # that refusal; the corrected retry (5) goes through.
        await a.publish_update(job, 1, 0, 0, pa)
        await expect(a, job, 1, errors.InvalidWeight)
        again = await a.publish_update(job, 1, 0, 0, pa)
        assert again.duplicate_of_own
        await expect(a, job, 1, errors.InvalidWeight)
        fixed = await a.publish_update(job, 1, 0, 5, pa)
        assert not fixed.duplicate_of_own and fixed.msg_id != again.msg_id
        # b: the same bytes inline, over the job's inline limit (raw: the SDK never does this).
        payload = to_safetensors(pb, spec.tensors)
        assert len(payload) > 200
        inline_id = wire.update_msg_id(job, 1, "rb", base_version=0, num_examples=7, kind="parameters", transport="inline", payload_sha256_hex=hashlib.sha256(payload).hexdigest())
        await b._watch(job)
        await b.nats.jetstream().publish(f"shoal.{job}.update.rb", payload, headers=wire.update_headers(msg_id=inline_id, round_=1, base_version=0, num_examples=7, kind="parameters"))
        await expect(b, job, 1, errors.PayloadTooLarge)
        up = await b.publish_update(job, 1, 0, 7, pb)
        assert up.transport == "upload" and up.chunks == 2 and up.msg_id != inline_id and not up.duplicate_of_own
        res = await asyncio.gather(a.wait_for_outcome(job, 1, timeout=TIMEOUT), b.wait_for_outcome(job, 1, timeout=TIMEOUT))
        assert all(r.committed and r.included for r in res), res
        assert res[0].outcome == shoal.Committed(1, 2, 12.0)
        np.testing.assert_array_equal((await a.fetch_model(job, 1))["w"], np.full(64, (5 * 1.0 + 7 * 4.0) / 12, np.float32))
        await close(a, b)

    run(go())


def test_node_at_capacity() -> None:
    server = NatsServer()
    node = Node(server.url, extra=["--max-jobs", "1"])
    try:
        create_job(server.url, job_spec("cap-a", [("w", "F32", [2], "mean")], cohort=2, deadline_ms=600_000))

        async def go() -> None:
            c = await shoal.ShoalClient.connect(server.url, "ca")
            await c.wait_for_open_round("cap-a", 1, timeout=TIMEOUT)
            create_job(server.url, job_spec("cap-b", [("w", "F32", [2], "mean")], cohort=2, deadline_ms=600_000))
            await c.publish_update("cap-b", 1, 0, 1, {"w": np.ones(2, np.float32)})
            await expect(c, "cap-b", 1, errors.NodeAtCapacity)
            await c.close()

        run(go())
    finally:
        node.stop()
        server.stop()


def test_a_squatted_message_id_does_not_stop_the_victims_update(cluster) -> None:
    """Decision 3 end to end: A publishes first with B's message id (A is refused as unauthorized);
    B's SDK gets a duplicate PubAck for an id it never sent, republishes with a nonce, and B's
    update is the one the round commits."""
    server, _ = cluster
    job = "py-squat"
    create_job(server.url, job_spec(job, [("w", "F32", [3], "mean")], cohort=1))

    async def go() -> None:
        a, b = await clients(server.url, "sa", "sb")
        state = await b.wait_for_open_round(job, 1, timeout=TIMEOUT)
        spec = await b.job_spec(job)
        mine = {"w": np.array([1.5, -2.0, 4.0], np.float32)}
        payload = to_safetensors(mine, spec.tensors)
        b_id = wire.update_msg_id(job, 1, "sb", base_version=0, num_examples=4, kind="parameters", transport="inline", payload_sha256_hex=hashlib.sha256(payload).hexdigest())
        await a._watch(job)
        junk = to_safetensors({"w": np.array([100.0, 100.0, 100.0], np.float32)}, spec.tensors)
        await a.nats.jetstream().publish(f"shoal.{job}.update.sa", junk, headers=wire.update_headers(msg_id=b_id, round_=1, base_version=0, num_examples=4, kind="parameters"))
        await expect(a, job, 1, errors.Unauthorized)
        r = await b.publish_update(job, state.round, state.model_version, 4, mine)
        assert r.republished
        res = await b.wait_for_outcome(job, 1, timeout=TIMEOUT)
        assert res.committed
        np.testing.assert_array_equal((await b.fetch_model(job, 1))["w"], mine["w"])
        await close(a, b)

    run(go())


def test_python_and_rust_clients_in_one_round(cluster) -> None:
    server, _ = cluster
    job = "py-interop"
    create_job(server.url, job_spec(job, [("w", "F32", [8], "mean"), ("b", "BF16", [4], "mean")], cohort=3))

    async def go() -> None:
        a, b = await clients(server.url, "pa", "pb")
        state = await a.wait_for_open_round(job, 1, timeout=TIMEOUT)
        spec = await a.job_spec(job)
        sent = [random_params(spec, s) for s in (21, 22, 23)]
        ns = [100, 300, 200]
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "rust.safetensors"
            f.write_bytes(to_safetensors(sent[2], spec.tensors))
            rust = await asyncio.create_subprocess_exec(
                shoal_bin(), "client", "--nats-url", server.url, "--job", job, "--client-id", "rust-1", "--update", str(f), "--num-examples", str(ns[2]), "--wait", "--timeout-secs", "60",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            await a.publish_update(job, state.round, state.model_version, ns[0], sent[0])
            await b.publish_update(job, state.round, state.model_version, ns[1], sent[1], force_upload=True)
            out, _ = await rust.communicate()
            assert rust.returncode == 0, out.decode()
        res = await a.wait_for_outcome(job, 1, timeout=TIMEOUT)
        assert res.outcome == shoal.Committed(1, 3, 600.0)
        model = await b.fetch_model(job, 1)
        assert_f32_close(model["w"], weighted_mean([p["w"] for p in sent], ns))
        oracle_b = bf16_nearest(weighted_mean([p["b"].astype(np.float64) for p in sent], ns))
        assert np.array_equal(model["b"].view(np.uint16), oracle_b.view(np.uint16))
        await close(a, b)

    run(go())


def test_least_permissions_from_the_generator(tmp_path) -> None:
    """`shoal auth nats-config --nkeys-dir` users: the node with its nkey, Python clients with
    theirs; inline and upload paths work, anything else is refused at once."""
    from conftest import shoal as shoal_cli

    job = "lp"
    text = shoal_cli("auth", "nats-config", "--job", job, "--clients", "pa,pb", "--nkeys-dir", str(tmp_path / "keys")).stdout
    server = NatsServer(authorization=text)
    node_seed = str(tmp_path / "keys" / "shoal-node.nk")
    seed = (tmp_path / "keys" / "shoal-node.nk").read_text().strip()
    node = Node(server.url, extra=["--nats-nkey", node_seed], probe={"nkeys_seed_str": seed})
    try:
        create_job(server.url, job_spec(job, [("w", "F32", [300_000], "mean")], cohort=2), creds=["--nats-nkey", node_seed])

        async def go() -> None:
            a = await shoal.ShoalClient.connect(server.url, "pa", nkey_seed_file=str(tmp_path / "keys" / "pa.nk"))
            b = await shoal.ShoalClient.connect(server.url, "pb", nkey_seed_file=str(tmp_path / "keys" / "pb.nk"))
            state = await a.wait_for_open_round(job, 1, timeout=TIMEOUT)
            pa = {"w": np.full(300_000, 1.0, np.float32)}
            pb = {"w": np.full(300_000, 4.0, np.float32)}
            ra = await a.publish_update(job, 1, 0, 1, pa)
            assert ra.transport == "upload" and ra.chunks >= 2  # 1.2 MB over the default 1 MiB max_payload
            rb = await b.publish_update(job, 1, 0, 2, pb, force_upload=True)
            assert rb.transport == "upload"
            res = await a.wait_for_outcome(job, 1, timeout=TIMEOUT)
            assert res.committed
            np.testing.assert_array_equal((await b.fetch_model(job, 1))["w"], np.full(300_000, 3.0, np.float32))
            with pytest.raises(shoal.PermissionDenied) as e:
                await a.job_state("another-job")
            assert "another-job" in e.value.subject
            await a.close()
            await b.close()

        run(go())
    finally:
        node.stop()
        server.stop()
