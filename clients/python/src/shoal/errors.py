"""The SDK's exceptions. Callers branch on the class (or on :attr:`UpdateRejected.reason`), never on
message text.

- :class:`ShoalError`: base of everything the SDK raises on purpose.
- :class:`UpdateRejected` and one subclass per rejection reason the node sends
  (:data:`REJECT_REASONS`), with ``.reason`` (the wire label) and ``.detail``.
- :class:`PermissionDenied`: the server refused a publish or subscription (least permissions),
  raised at once, naming the subject.
- :class:`UnknownJob`, :class:`ModelNotReady`, :class:`ModelUnavailable`, :class:`JobEnded`,
  :class:`UploadQuotaFull`, :class:`UpdateTooLarge`, :class:`NotProvisioned`,
  :class:`ProtocolError`, :class:`Timeout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .messages import JobState, RejectNotice


class ShoalError(Exception):
    """Base class of the SDK's errors."""


class PermissionDenied(ShoalError):
    """The NATS server refused an operation of this connection: ``op`` (``publish`` or
    ``subscription``) on ``subject``. Raised as soon as the server reports it, not after a
    time-out."""

    def __init__(self, what: str, op: str, subject: str, message: str):
        self.what = what
        self.op = op
        self.subject = subject
        self.message = message
        super().__init__(f"{what}: the server refused {op} to {subject!r} ({message})")


class AuthenticationFailed(ShoalError):
    """The server refused the credentials at connect time."""


class NotProvisioned(ShoalError):
    """Nothing answers on a JetStream subject: the streams and buckets have not been created (no
    node has run) or the job's upload stream does not exist."""


class UnknownJob(ShoalError):
    """The job has no state (never created, or deleted)."""

    def __init__(self, job: str):
        self.job = job
        super().__init__(f"job {job!r} does not exist")


class ModelNotReady(ShoalError):
    """A model version was asked for before it was committed (``version`` > the job state's
    ``model_version``): wait for the round to close, then fetch it."""

    def __init__(self, job: str, version: int, committed: int):
        self.job = job
        self.version = version
        self.committed = committed
        super().__init__(
            f"model version {version} of job {job!r} is not committed yet (the current version is {committed})"
        )


class ModelUnavailable(ShoalError):
    """A committed model version cannot be read: missing (expired or purged), deleted, or its chunks
    do not add up to its recorded size and digest."""


class JobEnded(ShoalError):
    """The job ended (finished, failed or cancelled) before what was waited for happened."""

    def __init__(self, job: str, state: JobState):
        self.job = job
        self.state = state
        super().__init__(f"job {job!r} is {state.phase}")


class UploadQuotaFull(ShoalError):
    """The job's upload stream is full (its ``upload_quota_bytes``): retry later."""


class UpdateTooLarge(ShoalError):
    """The update exceeds the job's ``max_update_bytes``; nothing was sent."""

    def __init__(self, size: int, limit: int):
        self.size = size
        self.limit = limit
        super().__init__(f"update of {size} bytes exceeds the job's max_update_bytes {limit}; nothing was sent")


class ProtocolError(ShoalError):
    """A message from the server that does not follow the protocol (undecodable state, a JetStream
    error reply)."""


class Timeout(ShoalError):
    """Waited longer than the caller allowed."""


class UpdateRejected(ShoalError):
    """A node refused this client's update. Subclasses name the reason; :attr:`reason` is its wire
    label and :attr:`detail` the node's explanation; :attr:`notice` the notice itself."""

    reason: str = ""

    def __init__(self, detail: str, notice: RejectNotice | None = None):
        self.detail = detail
        self.notice = notice
        super().__init__(f"update rejected ({self.reason}): {detail}")


def _reason(label: str, doc: str, name: str | None = None) -> type[UpdateRejected]:
    name = name or "".join(part.capitalize() for part in label.split("_"))
    cls = type(name, (UpdateRejected,), {"reason": label, "__doc__": doc, "__module__": __name__})
    return cls


MalformedHeaders = _reason("malformed_headers", "The subject or a header is missing or does not parse.")
UnknownJobRejected = _reason(
    "unknown_job", "The job of the update's subject does not exist.", name="UnknownJobRejected"
)
JobNotRunning = _reason("job_not_running", "The job is finished, failed or cancelled.")
LateUpdate = _reason(
    "late_update",
    "Sync: the update's round has closed. Asynchronous: its base version is more than max_staleness behind.",
)
WrongRound = _reason("wrong_round", "The update is for a round that is not open (more than one ahead).")
WrongBaseVersion = _reason(
    "wrong_base_version",
    "Sync: not trained from the round's model version. Asynchronous: a base newer than the current model.",
)
Duplicate = _reason("duplicate", "The client already has a different update in this round (or buffer).")
InvalidWeight = _reason("invalid_weight", "num_examples is missing, not decimal, 0 or above max_num_examples.")
PayloadTooLarge = _reason(
    "payload_too_large", "The inline payload exceeds inline_limit_bytes, or the update exceeds max_update_bytes."
)
SchemaMismatch = _reason(
    "schema_mismatch", "The tensors do not match the manifest (names, dtypes, shapes) or the kind is not the job's."
)
NonFinite = _reason("non_finite", "A float tensor holds NaN or an infinity.")
Malformed = _reason("malformed", "The payload is not valid safetensors, or an upload's chunks do not add up.")
ObjectUnavailable = _reason("object_unavailable", "An uploaded chunk is missing or unreadable.")
Unauthorized = _reason("unauthorized", "The Nats-Msg-Id does not belong to the sender's own subject and round.")
DigestMismatch = _reason("digest_mismatch", "The uploaded bytes do not match Shoal-Digest.")
TooManyTensors = _reason("too_many_tensors", "The safetensors header declares more tensors than the manifest has.")
CohortFull = _reason("cohort_full", "The round already holds max_clients_per_round updates on this node.")
NodeAtCapacity = _reason("node_at_capacity", "No node has room for the job (every node serves its max_jobs).")

#: Every rejection reason label, with its exception class.
REJECTIONS: dict[str, type[UpdateRejected]] = {
    c.reason: c
    for c in (
        MalformedHeaders,
        UnknownJobRejected,
        JobNotRunning,
        LateUpdate,
        WrongRound,
        WrongBaseVersion,
        Duplicate,
        InvalidWeight,
        PayloadTooLarge,
        SchemaMismatch,
        NonFinite,
        Malformed,
        ObjectUnavailable,
        Unauthorized,
        DigestMismatch,
        TooManyTensors,
        CohortFull,
        NodeAtCapacity,
    )
}
#: The rejection reasons of the protocol (wire labels).
REJECT_REASONS: tuple[str, ...] = tuple(REJECTIONS)


class UnknownReason(UpdateRejected):
    """A rejection with a reason this SDK version does not know (a newer node); see ``reason``."""

    def __init__(self, reason: str, detail: str, notice: RejectNotice | None = None):
        self.reason = reason
        super().__init__(detail, notice)


def rejection(notice: RejectNotice) -> UpdateRejected:
    """The exception for a rejection notice."""
    cls = REJECTIONS.get(notice.reason)
    if cls is None:
        return UnknownReason(notice.reason, notice.detail, notice)
    return cls(notice.detail, notice)
