"""``ShoalClient``: an asyncio client of one Shoal participant over nats-py.

Everything it does fits a client's least permissions (docs/protocol.md, "Permissions"): it reads
its job's spec and state with JetStream direct gets of the KV keys, reads models with direct gets
of the object store's metadata and chunks, publishes its update (inline, or through the job's
upload stream), listens on the job's round events and its own rejection notices, and receives
every reply under its own inbox prefix ``_INBOX_<client>``. It never creates a consumer, never
reads stream information and never writes to a bucket.

A permission violation reported by the server fails the waiting call at once with
:class:`~shoal.errors.PermissionDenied` naming the subject (nats-py reports violations only to
its error callback, which the client installs).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from . import errors, wire
from .errors import (
    AuthenticationFailed,
    JobEnded,
    ModelNotReady,
    ModelUnavailable,
    NotProvisioned,
    PermissionDenied,
    ProtocolError,
    ShoalError,
    Timeout,
    UnknownJob,
    UpdateTooLarge,
    UploadQuotaFull,
)
from .messages import (
    Committed,
    JobSpec,
    JobState,
    RejectNotice,
    RoundClosed,
    RoundOutcome,
    decode_round_event,
)
from .tensors import Params, from_safetensors, to_safetensors

log = logging.getLogger("shoal")
T = TypeVar("T")

_VIOLATION = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"]*)\"?", re.IGNORECASE)


@dataclass(frozen=True)
class Timings:
    """Every timing of the client, in seconds.

    - ``request``: one request/reply (direct get, JetStream publish acknowledgement).
    - ``state_poll``: how often a waiting client re-reads the job state when no event arrives
      (events on ``<p>.<job>.round`` wake it at once; the poll covers a missed event).
    - ``notice_grace``: after a round is seen closed when the state no longer describes that
      round's close (two closes between reads), how long to wait for a rejection notice the
      node may still be sending.
    - ``notice_wait``: after a round is seen closed *without* this client's update (its commit
      record, ``last_commit.applied``, does not list the update message's stream sequence), how
      long to wait for the notice that says why (``late_update``, ``job_not_running``...). A
      notice normally follows the close within milliseconds; this bounds a lost one.
    - ``connect``: one connection attempt; ``connect_deadline``: how long :meth:`ShoalClient.connect`
      keeps retrying an unreachable server (a refused login fails at once).
    """

    request: float = 10.0
    state_poll: float = 1.0
    notice_grace: float = 0.3
    notice_wait: float = 10.0
    connect: float = 5.0
    connect_deadline: float = 10.0


@dataclass(frozen=True)
class PublishResult:
    """What :meth:`ShoalClient.publish_update` did.

    ``transport`` is ``inline`` or ``upload``; ``chunks`` the number of upload chunks (0 inline);
    ``msg_id`` the ``Nats-Msg-Id`` finally used; ``stream_seq`` the update message's sequence in
    ``SHOAL_UPDATES``; ``duplicate_of_own`` that JetStream already held this very id from an
    earlier attempt of this client (the update is not sent twice, and :meth:`wait_for_outcome`
    answers with what became of that attempt, its refusal included); ``republished`` that JetStream
    held the id from a message this client did not send, so it was published again with a fresh
    nonce (decision 3)."""

    job: str
    round: int
    msg_id: str
    transport: str
    chunks: int
    payload_bytes: int
    stream_seq: int
    duplicate_of_own: bool = False
    republished: bool = False


@dataclass(frozen=True)
class RoundResult:
    """How a round that carried this client's update ended.

    - ``round``: the round whose close carried the update. For an asynchronous job this is the
      buffer (period) the update went into, which may be later than the one it was published
      for (an update that misses its buffer while being staged goes into the next).
    - ``outcome``: how that round closed (``None`` only when the state no longer holds it and
      its event was missed).
    - ``state``: the job state seen after it.
    - ``included``: whether the round closed with this update among those it counted (its commit
      record lists the update message): with :attr:`committed`, the model aggregated it (a
      robust strategy may still have given it no weight); with ``quorum_not_met`` it was counted
      and the previous model stands. ``False`` when the round closed without it and no notice
      came within ``timings.notice_wait``; ``None`` when the state seen no longer describes that
      round's close.
    """

    round: int
    outcome: RoundOutcome | None
    state: JobState
    included: bool | None = None

    @property
    def committed(self) -> bool:
        """Whether the round committed a model."""
        return isinstance(self.outcome, Committed)

    @property
    def version(self) -> int | None:
        """The model version the round committed, if it did."""
        return self.outcome.version if isinstance(self.outcome, Committed) else None


@dataclass(frozen=True)
class _Sent:
    """The latest update this client published for a (job, round): the index of the first
    notice that concerns it, whether it was republished under a nonce, its stream sequence in
    ``SHOAL_UPDATES`` (``None`` if the acknowledgement had none) and the job state's ``round``
    read just before it was sent (no round closed before that can hold it)."""

    cursor: int = 0
    republished: bool = False
    seq: int | None = None
    open_round: int = 0


@dataclass
class _JobWatch:
    """Per job: the round events and this client's rejection notices received so far."""

    notices: list[RejectNotice] = field(default_factory=list)
    closed: dict[int, RoundOutcome] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: bool = False


def _listing(state: JobState, seq: int | None) -> tuple[int, bool] | None:
    """The round whose close ``state``'s commit record describes, and whether the record lists
    the update message at stream sequence ``seq`` (``applied``: sorted inclusive ranges of
    ``SHOAL_UPDATES`` sequences); ``None`` without a record or a sequence."""
    rec = state.last_commit
    if not seq or not isinstance(rec, dict):
        return None
    try:
        return int(rec["round"]), any(int(lo) <= seq <= int(hi) for lo, hi in rec.get("applied") or [])
    except (KeyError, TypeError, ValueError):
        return None


def _after_close(state: JobState, target: int, seq: int | None, *, asynchronous: bool) -> tuple[str, int]:
    """What a client that waits for the close of round ``target`` concludes from ``state``, read
    after that round closed, about its update message at stream sequence ``seq``
    (docs/protocol.md 5.1, 9.2, 13):

    - ``("listed", r)``: the close of round ``r`` (≥ ``target``) counted the update;
    - ``("follow", r + 1)``: asynchronous, round ``r = target`` closed without it: it goes into
      a later buffer (while the job runs);
    - ``("refused", target)``: round ``target`` closed without it: the node refuses it, and a
      notice follows;
    - ``("unknown", target)``: the state does not describe round ``target``'s close (no
      sequence, or a later round closed too), so it cannot tell."""
    listing = _listing(state, seq)
    if listing is None:
        return "unknown", target
    r, listed = listing
    if listed and r >= target:
        return "listed", r
    if r != target:
        return "unknown", target
    if asynchronous and state.phase.running:
        return "follow", r + 1
    return "refused", target


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A TLS context trusting ``ca`` (PEM; the platform roots without it), presenting ``cert`` and
    ``key`` (PEM) when the server verifies clients."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if (cert is None) != (key is None):
        raise ValueError("a TLS client certificate and its key go together")
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


class ShoalClient:
    """One participant (``client_id``) of Shoal jobs. Create it with :meth:`connect`; use it as an
    async context manager or call :meth:`close`."""

    def __init__(self, nc: NatsClient, client_id: str, subjects: wire.Subjects, timings: Timings):
        self._nc = nc
        self.client_id = client_id
        self.subjects = subjects
        self.timings = timings
        self._specs: dict[str, JobSpec] = {}
        self._watches: dict[str, _JobWatch] = {}
        self._violation_waiters: set[asyncio.Future[PermissionDenied]] = set()
        self._subjects_used: dict[str, str] = {}
        # message id -> the notice index when this client first sent it (a byte-identical retry
        # that JetStream drops is answered by the notices about the first one)
        self._attempted_ids: dict[str, int] = {}
        # (job, round) -> the latest update published for it
        self._sent: dict[tuple[str, int], _Sent] = {}

    # -----------------------------------------------------------------------------------------
    # Connection
    # -----------------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str | list[str],
        client_id: str,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds: str | None = None,
        nkey_seed: str | None = None,
        nkey_seed_file: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        prefix: str = wire.DEFAULT_PREFIX,
        name: str | None = None,
        timings: Timings = Timings(),
    ) -> ShoalClient:
        """Connects as ``client_id`` with at most one credential: ``user`` + ``password``,
        ``token``, a ``creds`` file (JWT + nkey), an nkey seed (``nkey_seed`` string or
        ``nkey_seed_file``). TLS: an ``ssl.SSLContext``, or ``tls_ca`` / ``tls_cert`` /
        ``tls_key`` PEM files. Replies come to ``_INBOX_<client_id>``.

        Raises :class:`~shoal.errors.AuthenticationFailed` when the server refuses the
        credentials, ``ValueError`` for conflicting options, :class:`~shoal.errors.ShoalError`
        when no server can be reached."""
        wire.check_id("client id", client_id)
        subjects = wire.Subjects(prefix)
        methods = [m for m, on in (("user/password", user is not None or password is not None), ("token", token is not None), ("creds", creds is not None), ("nkey seed", nkey_seed is not None or nkey_seed_file is not None)) if on]
        if len(methods) > 1:
            raise ValueError(f"choose one NATS credential, not {' and '.join(methods)}")
        if (user is None) != (password is None):
            raise ValueError("a NATS user needs a password and a password a user")
        if tls is None and (tls_ca or tls_cert or tls_key):
            tls = tls_context(tls_ca, tls_cert, tls_key)
        holder: list[ShoalClient] = []
        loop = asyncio.get_running_loop()
        refused: asyncio.Future[BaseException] = loop.create_future()

        async def on_error(e: Exception) -> None:
            if holder:
                holder[0]._on_error(e)
            elif isinstance(e, nats.errors.AuthorizationError) or "authorization" in str(e).lower():
                if not refused.done():
                    refused.set_result(e)

        options: dict[str, Any] = dict(
            servers=url,
            name=name or f"shoal-py-{client_id}",
            error_cb=on_error,
            inbox_prefix=wire.inbox_prefix(client_id),
            connect_timeout=timings.connect,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
        )
        if user is not None:
            options.update(user=user, password=password)
        if token is not None:
            options.update(token=token)
        if creds is not None:
            options.update(user_credentials=creds)
        if nkey_seed is not None:
            options.update(nkeys_seed_str=nkey_seed)
        if nkey_seed_file is not None:
            options.update(nkeys_seed=nkey_seed_file)
        if tls is not None:
            options.update(tls=tls)
        # nats-py retries a refused login like an unreachable server: give up at the first refusal,
        # and on an unreachable server after ``timings.connect_deadline``.
        attempt = asyncio.ensure_future(nats.connect(**options))
        done, _ = await asyncio.wait({attempt, refused}, timeout=timings.connect_deadline, return_when=asyncio.FIRST_COMPLETED)
        if attempt not in done:
            attempt.cancel()
            try:
                await attempt
            except BaseException:  # the cancelled attempt's own error is not the story
                pass
            if refused.done():
                raise AuthenticationFailed(f"the NATS server refused the credentials of {client_id!r}: {refused.result()}")
            raise ShoalError(f"cannot connect to {url} within {timings.connect_deadline} s")
        try:
            nc = attempt.result()
        except Exception as e:
            if refused.done() or isinstance(e, nats.errors.AuthorizationError):
                raise AuthenticationFailed(f"the NATS server refused the credentials of {client_id!r}: {e}") from e
            raise ShoalError(f"cannot connect to {url}: {e!r}") from e
        client = cls(nc, client_id, subjects, timings)
        holder.append(client)
        return client

    async def close(self) -> None:
        """Drains and closes the connection."""
        if not self._nc.is_closed:
            try:
                await self._nc.drain()
            except Exception:  # closing is best effort
                await self._nc.close()

    async def __aenter__(self) -> ShoalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def nats(self) -> NatsClient:
        """The underlying nats-py connection."""
        return self._nc

    @property
    def max_payload(self) -> int:
        """The server's ``max_payload`` in bytes (headers count against it)."""
        return int(self._nc.max_payload)

    # -----------------------------------------------------------------------------------------
    # Permission violations
    # -----------------------------------------------------------------------------------------

    def _on_error(self, e: Exception) -> None:
        m = _VIOLATION.search(str(e))
        if m is None:
            log.debug("NATS error: %s", e)
            return
        op, lowered = m.group(1).lower(), m.group(2)
        # nats-py lower-cases the server's message: name the subject as this client wrote it.
        subject = self._subjects_used.get(lowered.lower(), lowered)
        log.warning("the NATS server refused %s to %r", op, subject)
        for fut in list(self._violation_waiters):
            if not fut.done():
                fut.set_result(PermissionDenied("", op, subject, str(e)))

    def _note_subject(self, subject: str) -> str:
        if len(self._subjects_used) > 4096:
            self._subjects_used.clear()
        self._subjects_used[subject.lower()] = subject
        return subject

    async def _guard(self, what: str, op: Awaitable[T]) -> T:
        """Runs ``op``; fails with :class:`PermissionDenied` as soon as the server reports a
        violation on this connection while it runs (concurrent operations cannot be told apart:
        a violation fails every guarded operation in flight)."""
        loop = asyncio.get_running_loop()
        violation: asyncio.Future[PermissionDenied] = loop.create_future()
        self._violation_waiters.add(violation)
        task = asyncio.ensure_future(op)
        try:
            done, _ = await asyncio.wait({task, violation}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            v = violation.result()
            raise PermissionDenied(what, v.op, v.subject, v.message)
        finally:
            self._violation_waiters.discard(violation)
            if not task.done():
                task.cancel()

    # -----------------------------------------------------------------------------------------
    # Requests and direct gets
    # -----------------------------------------------------------------------------------------

    async def _request(self, subject: str, payload: bytes = b"", headers: Mapping[str, str] | None = None) -> Msg:
        self._note_subject(subject)
        try:
            return await self._nc.request(subject, payload, timeout=self.timings.request, headers=dict(headers) if headers else None)
        except nats.errors.NoRespondersError as e:
            raise NotProvisioned(f"nothing answers on {subject!r} (are Shoal's streams provisioned?)") from e
        except nats.errors.TimeoutError as e:
            raise Timeout(f"no reply on {subject!r} within {self.timings.request} s") from e

    @staticmethod
    def _status(msg: Msg) -> str | None:
        h = msg.headers or {}
        return h.get("Status")

    async def _direct_get(self, subject: str, body: bytes = b"") -> Msg | None:
        """A direct get; ``None`` for 404 (no such message)."""
        msg = await self._request(subject, body)
        status = self._status(msg)
        if status is None and not msg.data and msg.headers is None:
            return None
        if status == "404":
            return None
        if status is not None and status not in ("200",):
            desc = (msg.headers or {}).get("Description", "")
            raise ProtocolError(f"direct get {subject!r} answered {status} {desc}")
        return msg

    async def _read_kv(self, job: str, key: str) -> bytes | None:
        subject = wire.kv_direct_get_subject(wire.JOBS_BUCKET, key)
        msg = await self._direct_get(subject)
        if msg is None:
            return None
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            return None
        return msg.data

    # -----------------------------------------------------------------------------------------
    # Job spec and state
    # -----------------------------------------------------------------------------------------

    async def job_state(self, job: str) -> JobState:
        """The job's current state (a direct get of ``<job>.state``).

        Raises :class:`UnknownJob`, :class:`PermissionDenied`, :class:`NotProvisioned`."""
        wire.check_id("job id", job)
        data = await self._guard("read the job state", self._read_kv(job, wire.job_state_key(job)))
        if data is None:
            raise UnknownJob(job)
        try:
            return JobState.decode(data)
        except wire.DecodeError as e:
            raise ProtocolError(str(e)) from e

    async def job_spec(self, job: str) -> JobSpec:
        """The job's spec (read once per job: a spec never changes).

        Raises :class:`UnknownJob`, :class:`PermissionDenied`, :class:`NotProvisioned`."""
        wire.check_id("job id", job)
        if job in self._specs:
            return self._specs[job]
        data = await self._guard("read the job spec", self._read_kv(job, wire.job_spec_key(job)))
        if data is None:
            raise UnknownJob(job)
        try:
            spec = JobSpec.decode(data)
        except wire.DecodeError as e:
            raise ProtocolError(str(e)) from e
        self._specs[job] = spec
        return spec

    # -----------------------------------------------------------------------------------------
    # Models
    # -----------------------------------------------------------------------------------------

    async def fetch_model_bytes(self, job: str, version: int) -> bytes:
        """Global model ``version`` of ``job`` as safetensors bytes, read with direct gets of
        object store ``shoal-models`` and checked against its recorded size and digest.

        Raises :class:`ModelNotReady` when ``version`` is above the committed model version,
        :class:`ModelUnavailable` when a committed version cannot be read, and
        :class:`UnknownJob`, :class:`PermissionDenied`."""
        wire.check_id("job id", job)
        if version < 0:
            raise ValueError("model versions start at 0")
        return await self._guard("read the model", self._read_model(job, version))

    async def _read_model(self, job: str, version: int) -> bytes:
        bucket, stream = wire.MODELS_BUCKET, wire.object_stream(wire.MODELS_BUCKET)
        name = wire.model_object(job, version)
        meta_msg = await self._direct_get(wire.direct_get_last_subject(stream, wire.object_meta_subject(bucket, name)))
        if meta_msg is None:
            state = await self.job_state(job)
            if version > state.model_version:
                raise ModelNotReady(job, version, state.model_version)
            raise ModelUnavailable(f"model {name!r} is not in {bucket} (expired or purged)")
        try:
            info = json.loads(meta_msg.data)
            size, chunks, nuid = int(info["size"]), int(info.get("chunks", 0)), str(info["nuid"])
        except (ValueError, KeyError, TypeError) as e:
            raise ModelUnavailable(f"model {name!r}: unreadable object metadata ({e})") from e
        if info.get("deleted"):
            raise ModelUnavailable(f"model {name!r} was deleted")
        chunk_subject = wire.object_chunk_subject(bucket, nuid)
        data = bytearray()
        seq = 1
        for index in range(chunks):
            body = json.dumps({"seq": seq, "next_by_subj": chunk_subject}).encode()
            msg = await self._direct_get(wire.direct_get_subject(stream), body)
            if msg is None:
                raise ModelUnavailable(f"model {name!r}: chunk {index + 1} of {chunks} is missing")
            data += msg.data
            if len(data) > size:
                raise ModelUnavailable(f"model {name!r}: chunks hold more than the recorded {size} bytes")
            seq = int((msg.headers or {}).get("Nats-Sequence", seq)) + 1
        if len(data) != size:
            raise ModelUnavailable(f"model {name!r}: {len(data)} bytes read, {size} recorded")
        digest = info.get("digest")
        if digest and digest != wire.object_digest(bytes(data)):
            raise ModelUnavailable(f"model {name!r}: the chunks' digest differs from the recorded {digest}")
        return bytes(data)

    async def fetch_model(self, job: str, version: int) -> Params:
        """Global model ``version`` as ``dict[str, numpy.ndarray]`` in manifest order and dtypes.

        Raises as :meth:`fetch_model_bytes`."""
        spec = await self.job_spec(job)
        return from_safetensors(await self.fetch_model_bytes(job, version), spec.tensors)

    async def fetch_reward(self, job: str) -> bytes:
        """This client's personal reward from the last committed round (RFFL: the sparsified
        aggregate delta to add to its model), as safetensors bytes.

        Raises :class:`ProtocolError` with the coordinator's reason when it refuses (strategy
        without rewards, not a participant, no round yet), :class:`NotProvisioned` when no
        coordinator answers."""
        subject = self.subjects.reward(job, self.client_id)
        msg = await self._guard("request the reward", self._request(subject, b""))
        why = (msg.headers or {}).get(wire.HDR_ERROR)
        if why is not None:
            raise ProtocolError(f"reward refused: {why}")
        return msg.data

    # -----------------------------------------------------------------------------------------
    # Events and notices
    # -----------------------------------------------------------------------------------------

    async def _watch(self, job: str) -> _JobWatch:
        """Subscribes (once per job) to the job's round events and this client's notices."""
        w = self._watches.get(job)
        if w is not None and w.subscribed:
            return w
        w = w or _JobWatch()
        self._watches[job] = w

        async def on_event(msg: Msg) -> None:
            try:
                e = decode_round_event(msg.data)
            except wire.DecodeError as err:
                log.warning("undecodable round event on %s: %s", msg.subject, err)
                return
            if isinstance(e, RoundClosed):
                w.closed[e.round] = e.outcome
            w.wake.set()

        async def on_notice(msg: Msg) -> None:
            try:
                n = RejectNotice.decode(msg.data)
            except wire.DecodeError as err:
                log.warning("undecodable rejection notice on %s: %s", msg.subject, err)
                return
            w.notices.append(n)
            w.wake.set()

        async def subscribe() -> None:
            events = self._note_subject(self.subjects.round_events(job))
            notices = self._note_subject(self.subjects.rejected(job, self.client_id))
            await self._nc.subscribe(events, cb=on_event)
            await self._nc.subscribe(notices, cb=on_notice)
            await self._nc.flush(timeout=self.timings.request)

        await self._guard("subscribe to the job's events and notices", subscribe())
        w.subscribed = True
        return w

    async def _wait_wake(self, w: _JobWatch, seconds: float) -> None:
        try:
            await asyncio.wait_for(w.wake.wait(), timeout=max(seconds, 0.0))
        except asyncio.TimeoutError:
            pass
        w.wake.clear()

    async def wait_for_open_round(self, job: str, round: int | None = None, timeout: float | None = None) -> JobState:
        """Waits until a round (``round`` or a later one) is open; returns the state, whose
        ``model_version`` is the base to train from and ``round`` the round to publish for.

        Raises :class:`JobEnded`, :class:`Timeout`, :class:`UnknownJob`."""
        w = await self._watch(job)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            state = await self.job_state(job)
            if state.is_open and (round is None or state.round >= round):
                return state
            if not state.phase.running:
                raise JobEnded(job, state)
            left = self.timings.state_poll if deadline is None else min(self.timings.state_poll, deadline - loop.time())
            if deadline is not None and left <= 0:
                raise Timeout(f"no round {round or ''} of job {job!r} opened within {timeout} s")
            await self._wait_wake(w, left)

    # -----------------------------------------------------------------------------------------
    # Publishing
    # -----------------------------------------------------------------------------------------

    async def _js_publish(self, subject: str, payload: bytes, headers: Mapping[str, str] | None, what: str) -> dict[str, Any]:
        msg = await self._request(subject, payload, headers)
        try:
            ack = json.loads(msg.data)
        except ValueError as e:
            status = self._status(msg)
            raise ProtocolError(f"{what}: not a JetStream acknowledgement (status {status})") from e
        err = ack.get("error") if isinstance(ack, dict) else None
        if err:
            desc = str(err.get("description", err))
            if "maximum" in desc.lower() and ("bytes" in desc.lower() or "messages" in desc.lower()):
                raise UploadQuotaFull(f"{what}: the job's upload quota is full ({desc})")
            raise ProtocolError(f"{what}: JetStream refused it ({desc}, code {err.get('code')}, err_code {err.get('err_code')})")
        return ack

    async def publish_update(
        self,
        job: str,
        round: int,
        base_version: int,
        num_examples: int,
        tensors: Mapping[str, Any] | None = None,
        *,
        safetensors: bytes | None = None,
        kind: str | None = None,
        force_upload: bool = False,
        check_limits: bool = True,
    ) -> PublishResult:
        """Publishes this client's update for ``round`` of ``job``, trained from model
        ``base_version`` on ``num_examples`` examples, and waits until JetStream has stored it.

        Give either ``tensors`` (``dict[str, numpy.ndarray]``, cast to the manifest's dtypes) or
        ``safetensors`` (bytes sent as they are). ``kind`` defaults to the job's ``update_kind``.
        The payload goes inline when it is at most the job's ``inline_limit_bytes`` (and fits the
        server's ``max_payload`` with its headers), else through the job's upload stream in
        ``chunk_bytes`` chunks; ``force_upload`` always uploads. The ``Nats-Msg-Id`` covers the
        headers that matter, the path and the bytes (decision 3), so a corrected retry goes
        through and an identical one is deduplicated.

        Subscribe-before-publish is handled: notices about this update are kept for
        :meth:`wait_for_outcome`.

        Raises :class:`UpdateTooLarge` (nothing sent) above the job's ``max_update_bytes`` unless
        ``check_limits`` is false; :class:`UploadQuotaFull`; :class:`PermissionDenied`;
        :class:`UnknownJob`; :class:`~shoal.tensors.TensorMismatch` for tensors that do not fit
        the manifest."""
        wire.check_id("job id", job)
        if (tensors is None) == (safetensors is None):
            raise ValueError("give either tensors or safetensors bytes")
        spec = await self.job_spec(job)
        payload = bytes(safetensors) if safetensors is not None else to_safetensors(tensors or {}, spec.tensors)
        kind = kind or spec.update_kind
        if check_limits and len(payload) > spec.max_update_bytes:
            raise UpdateTooLarge(len(payload), spec.max_update_bytes)
        w = await self._watch(job)
        return await self._guard("publish the update", self._publish(job, round, base_version, num_examples, kind, payload, spec, w, force_upload))

    def _limits(self, spec: JobSpec) -> tuple[int, int]:
        max_payload = self.max_payload
        inline = spec.inline_limit_bytes
        if inline is None:
            inline = max(0, max_payload - wire.HEADER_ALLOWANCE)
        chunk = spec.chunk_bytes or min(wire.DEFAULT_CHUNK_BYTES, max(1, inline))
        return inline, chunk

    async def _publish(
        self, job: str, round_: int, base: int, n: int, kind: str, payload: bytes, spec: JobSpec, w: _JobWatch, force_upload: bool
    ) -> PublishResult:
        inline_limit, chunk_bytes = self._limits(spec)
        digest = hashlib.sha256(payload).hexdigest()
        upload = force_upload or len(payload) > inline_limit
        if not upload:
            probe = wire.update_headers(msg_id=wire.update_msg_id(job, round_, self.client_id, base_version=base, num_examples=n, kind=kind, transport="inline", payload_sha256_hex=digest, nonce="x" * 16), round_=round_, base_version=base, num_examples=n, kind=kind)
            upload = wire.header_block_size(probe) + len(payload) > self.max_payload
        chunks = 0
        if upload:
            chunks = wire.chunk_count(len(payload), chunk_bytes)
            for i in range(chunks):
                part = payload[i * chunk_bytes : (i + 1) * chunk_bytes]
                await self._js_publish(self._note_subject(self.subjects.upload_chunk(job, self.client_id, round_, i)), part, None, f"upload chunk {i}")
            transport = wire.transport_upload(chunks, len(payload))
            body = b""
            upload_hdr: tuple[int, int, str] | None = (chunks, len(payload), digest)
        else:
            transport, body, upload_hdr = wire.transport_inline(), payload, None
        subject = self._note_subject(self.subjects.update(job, self.client_id))
        cursor = len(w.notices)
        try:
            open_round = (await self.job_state(job)).round
        except UnknownJob:
            open_round = 0  # no state yet: no round has closed

        async def send(nonce: str | None) -> tuple[str, dict[str, Any]]:
            msg_id = wire.update_msg_id(job, round_, self.client_id, base_version=base, num_examples=n, kind=kind, transport=transport, payload_sha256_hex=digest, nonce=nonce)
            headers = wire.update_headers(msg_id=msg_id, round_=round_, base_version=base, num_examples=n, kind=kind, upload=upload_hdr)
            known = msg_id in self._attempted_ids
            self._attempted_ids.setdefault(msg_id, cursor)
            ack = await self._js_publish(subject, body, headers, "publish the update")
            ack["_known"] = known
            return msg_id, ack

        msg_id, ack = await send(None)
        own = republished = False
        if ack.get("duplicate"):
            if ack["_known"]:
                own = True
                # JetStream dropped this copy: what the node says about the first one answers it.
                cursor = self._attempted_ids[msg_id]
            else:
                # Someone else published this id first (decision 3): publish again under an id
                # nobody can have guessed.
                log.warning(
                    "JetStream already held message id %s, which this client never sent; publishing the update again with a fresh nonce",
                    msg_id,
                )
                msg_id, ack = await send(wire.fresh_nonce())
                republished = True
                if ack.get("duplicate"):
                    raise ProtocolError(f"JetStream reports a fresh random message id {msg_id} as a duplicate")
        seq = int(ack["seq"]) if ack.get("seq") else None
        self._sent[(job, round_)] = _Sent(cursor, republished, seq, open_round)
        return PublishResult(
            job=job,
            round=round_,
            msg_id=msg_id,
            transport="upload" if upload else "inline",
            chunks=chunks,
            payload_bytes=len(payload),
            stream_seq=int(ack.get("seq", 0)),
            duplicate_of_own=own,
            republished=republished,
        )

    # -----------------------------------------------------------------------------------------
    # Outcomes
    # -----------------------------------------------------------------------------------------

    def _notice_for(self, job: str, round_: int, w: _JobWatch) -> RejectNotice | None:
        sent = self._sent.get((job, round_), _Sent())
        for n in w.notices[sent.cursor :]:
            if n.round not in (round_, None):
                continue
            if sent.republished and n.reason == "duplicate":
                # Our nonce'd copy was refused because an earlier update of ours is in the round:
                # that one counts (an attacker's message on its own subject can never be ours).
                log.info("the republished copy was refused as a duplicate of this client's earlier update, which counts")
                continue
            return n
        return None

    async def wait_for_outcome(self, job: str, round: int, timeout: float | None = None) -> RoundResult:
        """Waits until the round that carries this client's update for ``round`` closes, or the
        node refuses the update.

        Listens on the job's round events and on ``<p>.<job>.rejected.<client>``, and re-reads the
        job state at least every ``timings.state_poll`` seconds (events can be missed). When the
        round closes, the state's commit record tells whether it closed with this client's
        latest update for ``round`` (by the stream sequence of its publish acknowledgement):

        - listed: returns at once;
        - not listed, synchronous job: the node refuses the update (``late_update``...); waits up
          to ``timings.notice_wait`` for the notice and raises it;
        - not listed, asynchronous job: the update went into a later buffer; waits for that one.

        Returns a :class:`RoundResult`. Raises the :class:`~shoal.errors.UpdateRejected`
        subclass of the notice's reason, :class:`JobEnded` if the job ends (cancelled) before
        the round closes, :class:`Timeout`."""
        w = await self._watch(job)
        spec = await self.job_spec(job)
        sent = self._sent.get((job, round), _Sent())
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # The round (buffer) whose close is awaited: asynchronously, an update goes into the
        # buffer open when it arrives, never into one that closed before it was sent.
        target = max(round, sent.open_round) if spec.asynchronous else round
        while True:
            notice = self._notice_for(job, round, w)
            if notice is not None:
                raise errors.rejection(notice)
            state = await self.job_state(job)
            outcome = w.closed.get(target)
            closed = outcome is not None or state.round > target or (state.phase.name in ("finished", "failed") and state.round >= target)
            if closed:
                verdict, r = _after_close(state, target, sent.seq, asynchronous=spec.asynchronous)
                if verdict != "listed" and not spec.asynchronous and sent.open_round > round:
                    verdict = "refused"  # sent after its round had closed: refused as late
                if verdict == "listed":
                    return RoundResult(r, state.last_outcome, state, included=True)
                if verdict == "follow":
                    log.info("buffer %d of job %s closed without this client's update: it goes into the next", target, job)
                    target = r
                    continue
                if outcome is None and (state.round == target + 1 or (not state.phase.running and state.round == target)):
                    outcome = state.last_outcome
                if verdict == "refused":
                    return await self._await_refusal(job, round, w, RoundResult(target, outcome, state, included=False), deadline)
                # Unknown: a notice, if any, normally follows the close within milliseconds.
                await self._wait_wake(w, self.timings.notice_grace)
                notice = self._notice_for(job, round, w)
                if notice is not None:
                    raise errors.rejection(notice)
                return RoundResult(target, outcome or w.closed.get(target), state, included=None)
            if not state.phase.running:
                raise JobEnded(job, state)
            left = self.timings.state_poll if deadline is None else min(self.timings.state_poll, deadline - loop.time())
            if deadline is not None and left <= 0:
                raise Timeout(f"round {target} of job {job!r} did not close within {timeout} s")
            await self._wait_wake(w, left)

    async def _await_refusal(self, job: str, round_: int, w: _JobWatch, closed: RoundResult, deadline: float | None) -> RoundResult:
        """After ``closed.round`` closed without this client's update: waits up to
        ``timings.notice_wait`` (and not past ``deadline``, a loop time) for the notice that says
        why and raises it; returns ``closed`` (with a warning) if none comes."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.timings.notice_wait
        if deadline is not None:
            until = min(until, deadline)
        while True:
            notice = self._notice_for(job, round_, w)
            if notice is not None:
                raise errors.rejection(notice)
            sent = self._sent.get((job, round_), _Sent())
            if sent.republished and any(n.reason == "duplicate" and n.round in (round_, None) for n in w.notices[sent.cursor :]):
                # The republished copy was refused because an earlier update of this client is in
                # the round; that one is listed under a sequence this client does not know.
                return RoundResult(closed.round, closed.outcome, closed.state, included=None)
            left = until - loop.time()
            if left <= 0:
                log.warning("round %d of job %s closed without this client's update and no notice came", closed.round, job)
                return closed
            await self._wait_wake(w, min(self.timings.state_poll, left))

    async def publish_and_wait(
        self,
        job: str,
        round: int,
        base_version: int,
        num_examples: int,
        tensors: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> RoundResult:
        """:meth:`publish_update` then :meth:`wait_for_outcome`."""
        await self.publish_update(job, round, base_version, num_examples, tensors, **kwargs)
        return await self.wait_for_outcome(job, round, timeout)


ProgressCallback = Callable[[RoundResult], None]
