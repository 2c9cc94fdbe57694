"""Shoal's control messages as typed Python values, and their wire form.

Every message travels in the envelope ``{"v": 1, "body": ...}`` as msgpack with named fields
(docs/protocol.md, "Envelope"). Maps are written with their fields in the order the schemas below
list them, which is the order Rust's ``rmp_serde::to_vec_named`` writes, so a value decoded and
encoded again gives the same bytes (the golden vectors in ``proto/vectors/`` are tested that way).
Decoders do not depend on the order. Floats are written as float 64, integers in their smallest
msgpack form, absent optional values as ``nil``.

- :class:`JobState`: KV ``shoal-jobs`` key ``<job>.state``;
- :class:`RoundOpened`, :class:`RoundClosed`, :class:`JobEnded` (a :data:`RoundEvent`):
  subject ``<prefix>.<job>.round``;
- :class:`RejectNotice`: subject ``<prefix>.<job>.rejected.<client>``;
- :class:`JobSpec`: KV key ``<job>.spec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from .wire import DecodeError, decode_envelope, encode_envelope

# ---------------------------------------------------------------------------------------------
# Schemas: field order and types of every map, for canonical encoding
# ---------------------------------------------------------------------------------------------
# A schema is one of: "f64" (written as a float), "int", "str", "bool", "any" (as is),
# ("opt", s), ("list", s), ("struct", fields) with fields a tuple of (name, schema, skip_if_none),
# ("tagged", tag_key, {tag: fields}). Unknown keys of a map are kept after the known ones.

Schema = Any


def _s(*fields: tuple[str, Schema] | tuple[str, Schema, bool]) -> tuple[Any, ...]:
    return tuple((f[0], f[1], f[2] if len(f) > 2 else False) for f in fields)  # type: ignore[misc]


_TENSOR = ("struct", _s(("name", "str"), ("dtype", "str"), ("shape", ("list", "int")), ("policy", "str")))
_MANIFEST = ("struct", _s(("tensors", ("list", _TENSOR))))
_STALENESS = (
    "tagged",
    "kind",
    {
        "constant": _s(),
        "threshold": _s(("cutoff", "int"), ("value", "f64"), ("avg_staleness", ("opt", "f64"))),
        "polynomial": _s(("exponent", "f64"), ("avg_staleness", ("opt", "f64"))),
    },
)
_FEDFIX_CLIENT = ("struct", _s(("client", "str"), ("compute_ticks", "int"), ("importance", ("opt", "f64"))))
_STRATEGY = (
    "tagged",
    "name",
    {
        "fedavg": _s(("server_learning_rate", "f64")),
        "fedbuff": _s(
            ("buffer_size", "int"),
            ("staleness", _STALENESS),
            ("normalisation", "str"),
            ("example_weight", "str"),
            ("server_lr", "f64"),
        ),
        "fedfix": _s(("period_ticks", "int"), ("server_learning_rate", "f64"), ("clients", ("list", _FEDFIX_CLIENT))),
        "median": _s(),
        "trimmed-mean": _s(("beta", "f64")),
        "krum": _s(("byzantine", "int")),
        "multi-krum": _s(("byzantine", "int"), ("keep", "int")),
        "bulyan": _s(("byzantine", "int")),
        "rffl": _s(
            ("gamma", "f64"),
            ("alpha", "f64"),
            ("rth", "f64"),
            ("warmup_rounds", "int"),
            ("altruism_degree", ("opt", "f64")),
            ("sparsify", "bool"),
            ("mode", "str"),
        ),
        "bristle": _s(("alpha", "f64"), ("beta", "int"), ("seed", "int"), ("mode", "str")),
    },
)
_ROUND_POLICY = (
    "tagged",
    "mode",
    {
        "sync": _s(("cohort_size", "int"), ("min_clients", "int"), ("deadline_ms", "int")),
        "buffered": _s(("max_wait_ms", "int"), ("max_staleness", "int")),
        "periodic": _s(("period_ms", "int"), ("max_staleness", "int")),
    },
)
_SERVER_OPTIMIZER = (
    "tagged",
    "name",
    {
        "fedavgm": _s(("lr", "f64"), ("momentum", "f64")),
        "fedadam": _s(("lr", "f64"), ("beta1", "f64"), ("beta2", "f64"), ("tau", "f64"), ("bias_correction", "str")),
        "fedyogi": _s(("lr", "f64"), ("beta1", "f64"), ("beta2", "f64"), ("tau", "f64")),
        "fedadagrad": _s(("lr", "f64"), ("beta1", "f64"), ("tau", "f64")),
    },
)
JOB_SPEC_SCHEMA = (
    "struct",
    _s(
        ("job", "str"),
        ("manifest", _MANIFEST),
        ("strategy", _STRATEGY),
        ("round_policy", _ROUND_POLICY),
        ("update_kind", "str"),
        ("rounds", "int"),
        ("max_num_examples", "int"),
        ("max_failed_rounds", "int"),
        ("fan_in", "int"),
        ("server_optimizer", ("opt", _SERVER_OPTIMIZER)),
        ("max_update_bytes", ("opt", "int"), True),
        ("max_clients_per_round", ("opt", "int"), True),
        ("inline_limit_bytes", ("opt", "int"), True),
        ("chunk_bytes", ("opt", "int"), True),
        ("upload_quota_bytes", ("opt", "int"), True),
    ),
)
_PHASE = ("tagged", "phase", {"running": _s(), "finished": _s(), "failed": _s(("reason", "str")), "cancelled": _s(("reason", "str"))})
_OUTCOME = (
    "tagged",
    "outcome",
    {
        "committed": _s(("version", "int"), ("clients", "int"), ("total_weight", "f64")),
        "quorum_not_met": _s(("accepted", "int"), ("min_clients", "int")),
        "aggregation_failed": _s(("detail", "str"), ("kind", ("opt", "str"))),
    },
)
_COMMIT_RECORD = (
    "struct",
    _s(("round", "int"), ("collect", "int"), ("nodes", ("list", "str")), ("applied", ("list", ("list", "int")))),
)
JOB_STATE_SCHEMA = (
    "struct",
    _s(
        ("phase", _PHASE),
        ("round", "int"),
        ("model_version", "int"),
        ("opened_at_ms", "int"),
        ("deadline_at_ms", "int"),
        ("failed_rounds_in_a_row", "int"),
        ("last_outcome", ("opt", _OUTCOME)),
        ("last_commit", ("opt", _COMMIT_RECORD)),
    ),
)
ROUND_EVENT_SCHEMA = (
    "tagged",
    "event",
    {
        "round_opened": _s(("job", "str"), ("round", "int"), ("base_version", "int"), ("deadline_at_ms", "int")),
        "round_closed": _s(("job", "str"), ("round", "int"), ("outcome", _OUTCOME)),
        "job_ended": _s(("job", "str"), ("phase", _PHASE)),
    },
)
REJECT_NOTICE_SCHEMA = (
    "struct",
    _s(("job", "str"), ("client", "str"), ("round", ("opt", "int")), ("reason", "str"), ("detail", "str")),
)
LEASE_SCHEMA = ("struct", _s(("node", "str"), ("instance", "int"), ("renewed_ms", "int")))


def canonical(schema: Schema, value: Any, path: str = "") -> Any:
    """``value`` in wire form: maps in schema order (unknown keys after), floats as floats.

    Raises :class:`DecodeError` when ``value`` does not fit ``schema`` (a missing field, a wrong
    type, an unknown tag).
    """
    if schema == "any":
        return value
    if schema == "f64":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DecodeError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if schema == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError(f"{path}: expected an integer, got {value!r}")
        return value
    if schema == "str":
        if not isinstance(value, str):
            raise DecodeError(f"{path}: expected a string, got {value!r}")
        return value
    if schema == "bool":
        if not isinstance(value, bool):
            raise DecodeError(f"{path}: expected a boolean, got {value!r}")
        return value
    kind = schema[0]
    if kind == "opt":
        return None if value is None else canonical(schema[1], value, path)
    if kind == "list":
        if not isinstance(value, (list, tuple)):
            raise DecodeError(f"{path}: expected a list, got {value!r}")
        return [canonical(schema[1], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, Mapping):
        raise DecodeError(f"{path}: expected a map, got {value!r}")
    if kind == "struct":
        return _fields(schema[1], value, path, ())
    if kind == "tagged":
        tag_key, variants = schema[1], schema[2]
        tag = value.get(tag_key)
        if tag not in variants:
            raise DecodeError(f"{path}.{tag_key}: unknown {tag_key} {tag!r}")
        out: dict[str, Any] = {tag_key: tag}
        out.update(_fields(variants[tag], value, path, (tag_key,)))
        return out
    raise AssertionError(f"bad schema {schema!r}")


def _fields(fields: tuple[Any, ...], value: Mapping[str, Any], path: str, skip: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, schema, skip_if_none in fields:
        if name not in value:
            if skip_if_none or (isinstance(schema, tuple) and schema[0] == "opt"):
                if not skip_if_none:
                    out[name] = None
                continue
            raise DecodeError(f"{path}.{name}: missing")
        v = value[name]
        if v is None and skip_if_none:
            continue
        out[name] = canonical(schema, v, f"{path}.{name}")
    known = {f[0] for f in fields} | set(skip)
    for k, v in value.items():
        if k not in known:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Job state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobPhase:
    """A job's lifecycle phase: ``running``, ``finished``, ``failed`` or ``cancelled`` (the last
    two with a ``reason``). On the wire a map tagged by ``phase``: ``{"phase": "failed",
    "reason": "..."}``."""

    name: str
    reason: str | None = None

    @property
    def running(self) -> bool:
        """Whether rounds are running."""
        return self.name == "running"

    def to_wire(self) -> dict[str, Any]:
        """Wire form."""
        out: dict[str, Any] = {"phase": self.name}
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    @staticmethod
    def from_wire(v: Mapping[str, Any]) -> JobPhase:
        """From the wire form (checked)."""
        c = canonical(_PHASE, v, "phase")
        return JobPhase(c["phase"], c.get("reason"))

    def __str__(self) -> str:
        return self.name if self.reason is None else f"{self.name} ({self.reason})"


@dataclass(frozen=True)
class Committed:
    """Round outcome: model ``version`` committed from ``clients`` updates of total weight
    ``total_weight``."""

    version: int
    clients: int
    total_weight: float


@dataclass(frozen=True)
class QuorumNotMet:
    """Round outcome: only ``accepted`` updates by the deadline, ``min_clients`` needed; the
    previous model stands."""

    accepted: int
    min_clients: int


@dataclass(frozen=True)
class AggregationFailed:
    """Round outcome: the strategy produced no model (``kind`` e.g. ``zero_total_weight``,
    ``non_finite_result``); the previous model stands."""

    detail: str
    kind: str | None = None


RoundOutcome = Union[Committed, QuorumNotMet, AggregationFailed]


def outcome_from_wire(v: Mapping[str, Any]) -> RoundOutcome:
    """A :data:`RoundOutcome` from its wire form (a map tagged by ``outcome``)."""
    c = canonical(_OUTCOME, v, "outcome")
    tag = c["outcome"]
    if tag == "committed":
        return Committed(c["version"], c["clients"], c["total_weight"])
    if tag == "quorum_not_met":
        return QuorumNotMet(c["accepted"], c["min_clients"])
    return AggregationFailed(c["detail"], c["kind"])


def outcome_to_wire(o: RoundOutcome) -> dict[str, Any]:
    """The wire form of a :data:`RoundOutcome`."""
    if isinstance(o, Committed):
        return {"outcome": "committed", "version": o.version, "clients": o.clients, "total_weight": float(o.total_weight)}
    if isinstance(o, QuorumNotMet):
        return {"outcome": "quorum_not_met", "accepted": o.accepted, "min_clients": o.min_clients}
    return {"outcome": "aggregation_failed", "detail": o.detail, "kind": o.kind}


@dataclass(frozen=True)
class JobState:
    """A job's state (KV ``shoal-jobs``, key ``<job>.state``), written only by the committing node.

    - ``round``: the open round; after the job ends, the last round run.
    - ``model_version``: the current global model, the base clients train from.
    - ``opened_at_ms`` / ``deadline_at_ms``: when the open round opened and its deadline (ms since
      the Unix epoch); 0 until a node opens it.
    - ``last_outcome``: how the previous round ended (``None`` before the first).
    - ``last_commit``: cluster bookkeeping of the previous commit (opaque to clients).
    """

    phase: JobPhase
    round: int
    model_version: int
    opened_at_ms: int
    deadline_at_ms: int
    failed_rounds_in_a_row: int
    last_outcome: RoundOutcome | None
    last_commit: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_open(self) -> bool:
        """Whether the round ``round`` is open (running and opened by a node)."""
        return self.phase.running and self.opened_at_ms > 0

    @staticmethod
    def from_wire(v: Any) -> JobState:
        """From the envelope's body (checked)."""
        c = canonical(JOB_STATE_SCHEMA, v, "job state")
        known = {f[0] for f in JOB_STATE_SCHEMA[1]}
        return JobState(
            phase=JobPhase.from_wire(c["phase"]),
            round=c["round"],
            model_version=c["model_version"],
            opened_at_ms=c["opened_at_ms"],
            deadline_at_ms=c["deadline_at_ms"],
            failed_rounds_in_a_row=c["failed_rounds_in_a_row"],
            last_outcome=None if c["last_outcome"] is None else outcome_from_wire(c["last_outcome"]),
            last_commit=c["last_commit"],
            extra={k: v for k, v in c.items() if k not in known},
        )

    def to_wire(self) -> dict[str, Any]:
        """The envelope's body."""
        body = {
            "phase": self.phase.to_wire(),
            "round": self.round,
            "model_version": self.model_version,
            "opened_at_ms": self.opened_at_ms,
            "deadline_at_ms": self.deadline_at_ms,
            "failed_rounds_in_a_row": self.failed_rounds_in_a_row,
            "last_outcome": None if self.last_outcome is None else outcome_to_wire(self.last_outcome),
            "last_commit": self.last_commit,
        }
        body.update(self.extra)
        return canonical(JOB_STATE_SCHEMA, body, "job state")

    @staticmethod
    def decode(data: bytes) -> JobState:
        """From envelope bytes."""
        return JobState.from_wire(decode_envelope("job state", data))

    def encode(self) -> bytes:
        """To envelope bytes."""
        return encode_envelope(self.to_wire())


# ---------------------------------------------------------------------------------------------
# Round events and rejection notices
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundOpened:
    """Event: ``round`` opened; clients train from ``base_version`` until ``deadline_at_ms``."""

    job: str
    round: int
    base_version: int
    deadline_at_ms: int


@dataclass(frozen=True)
class RoundClosed:
    """Event: ``round`` closed with ``outcome``."""

    job: str
    round: int
    outcome: RoundOutcome


@dataclass(frozen=True)
class JobEnded:
    """Event: the job ended in ``phase`` (finished, failed or cancelled)."""

    job: str
    phase: JobPhase


RoundEvent = Union[RoundOpened, RoundClosed, JobEnded]


def round_event_from_wire(v: Any) -> RoundEvent:
    """A :data:`RoundEvent` from the envelope's body (a map tagged by ``event``)."""
    c = canonical(ROUND_EVENT_SCHEMA, v, "round event")
    tag = c["event"]
    if tag == "round_opened":
        return RoundOpened(c["job"], c["round"], c["base_version"], c["deadline_at_ms"])
    if tag == "round_closed":
        return RoundClosed(c["job"], c["round"], outcome_from_wire(c["outcome"]))
    return JobEnded(c["job"], JobPhase.from_wire(c["phase"]))


def round_event_to_wire(e: RoundEvent) -> dict[str, Any]:
    """The envelope's body of a :data:`RoundEvent`."""
    if isinstance(e, RoundOpened):
        return {"event": "round_opened", "job": e.job, "round": e.round, "base_version": e.base_version, "deadline_at_ms": e.deadline_at_ms}
    if isinstance(e, RoundClosed):
        return {"event": "round_closed", "job": e.job, "round": e.round, "outcome": outcome_to_wire(e.outcome)}
    return {"event": "job_ended", "job": e.job, "phase": e.phase.to_wire()}


def decode_round_event(data: bytes) -> RoundEvent:
    """A :data:`RoundEvent` from envelope bytes."""
    return round_event_from_wire(decode_envelope("round event", data))


@dataclass(frozen=True)
class RejectNotice:
    """Why a node refused one of this client's updates (subject ``<p>.<job>.rejected.<client>``).

    ``round`` is the update's ``Shoal-Round`` header when it parsed; ``reason`` one of
    :data:`shoal.errors.REJECT_REASONS`; ``detail`` a human-readable explanation."""

    job: str
    client: str
    round: int | None
    reason: str
    detail: str

    @staticmethod
    def from_wire(v: Any) -> RejectNotice:
        """From the envelope's body (checked)."""
        c = canonical(REJECT_NOTICE_SCHEMA, v, "reject notice")
        return RejectNotice(c["job"], c["client"], c["round"], c["reason"], c["detail"])

    def to_wire(self) -> dict[str, Any]:
        """The envelope's body."""
        return {"job": self.job, "client": self.client, "round": self.round, "reason": self.reason, "detail": self.detail}

    @staticmethod
    def decode(data: bytes) -> RejectNotice:
        """From envelope bytes."""
        return RejectNotice.from_wire(decode_envelope("reject notice", data))


# ---------------------------------------------------------------------------------------------
# Job spec
# ---------------------------------------------------------------------------------------------

#: Element size in bytes of each manifest dtype.
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the manifest: ``name``, ``dtype`` (``F32``, ``BF16``, ``I64``, ...), ``shape``
    (C order, ``()`` for a scalar) and aggregation ``policy`` (``mean``, ``statistic``,
    ``variance``, ``max``, ``first``, ``skip``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    policy: str = "mean"

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Data bytes."""
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def is_float(self) -> bool:
        """Whether the dtype is a float type."""
        return self.dtype in ("F32", "F16", "BF16", "F64")


class JobSpec:
    """A job's spec (KV key ``<job>.spec``), as the node stored it with every default filled in.

    The typed accessors cover what a client needs; :attr:`raw` is the whole body in wire form
    (strategy and server optimizer included)."""

    def __init__(self, raw: Mapping[str, Any]):
        self.raw: dict[str, Any] = canonical(JOB_SPEC_SCHEMA, raw, "job spec")
        self.tensors: tuple[TensorSpec, ...] = tuple(
            TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t["policy"]) for t in self.raw["manifest"]["tensors"]
        )
        for t in self.tensors:
            if t.dtype not in DTYPE_SIZES:
                raise DecodeError(f"job spec: tensor {t.name!r} has unknown dtype {t.dtype!r}")

    @property
    def job(self) -> str:
        """The job id."""
        return str(self.raw["job"])

    @property
    def update_kind(self) -> str:
        """``parameters`` or ``delta``: what updates carry."""
        return str(self.raw["update_kind"])

    @property
    def rounds(self) -> int:
        """Models to commit; the job finishes when model version ``rounds`` is committed."""
        return int(self.raw["rounds"])

    @property
    def round_policy(self) -> dict[str, Any]:
        """The round policy map (``mode`` = ``sync``, ``buffered`` or ``periodic``)."""
        return dict(self.raw["round_policy"])

    @property
    def asynchronous(self) -> bool:
        """Whether rounds are asynchronous (``buffered``: FedBuff; ``periodic``: FedFix)."""
        return self.raw["round_policy"]["mode"] != "sync"

    @property
    def max_staleness(self) -> int:
        """Oldest base version accepted, in versions behind the current model (0 in sync rounds)."""
        return int(self.raw["round_policy"].get("max_staleness", 0))

    @property
    def strategy(self) -> dict[str, Any]:
        """The strategy map (``name`` and its hyperparameters)."""
        return dict(self.raw["strategy"])

    @property
    def server_optimizer(self) -> dict[str, Any] | None:
        """The server optimizer map, or ``None``."""
        so = self.raw.get("server_optimizer")
        return None if so is None else dict(so)

    @property
    def max_num_examples(self) -> int:
        """Largest ``num_examples`` one update may declare."""
        return int(self.raw["max_num_examples"])

    @property
    def data_bytes(self) -> int:
        """Sum of the tensors' data bytes."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def header_allowance(self) -> int:
        """Room for the safetensors header in the default ``max_update_bytes``: 64 KiB plus, per
        tensor, 256 bytes and 6 bytes per name byte."""
        return 64 * 1024 + sum(256 + 6 * len(t.name.encode()) for t in self.tensors)

    @property
    def max_update_bytes(self) -> int:
        """Largest update payload accepted, either path: the spec's value, or data bytes plus
        :attr:`header_allowance`."""
        v = self.raw.get("max_update_bytes")
        return int(v) if v is not None else self.data_bytes + self.header_allowance

    @property
    def inline_limit_bytes(self) -> int | None:
        """Largest inline payload (decision 1), when the spec publishes it."""
        v = self.raw.get("inline_limit_bytes")
        return None if v is None else int(v)

    @property
    def chunk_bytes(self) -> int | None:
        """Upload chunk size (decision 1), when the spec publishes it."""
        v = self.raw.get("chunk_bytes")
        return None if v is None else int(v)

    def tensor(self, name: str) -> TensorSpec:
        """The tensor called ``name`` (``KeyError`` if none)."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_wire(self) -> dict[str, Any]:
        """The envelope's body."""
        return dict(self.raw)

    @staticmethod
    def decode(data: bytes) -> JobSpec:
        """From envelope bytes."""
        return JobSpec(decode_envelope("job spec", data))

    def encode(self) -> bytes:
        """To envelope bytes."""
        return encode_envelope(self.raw)

    def __repr__(self) -> str:
        return f"JobSpec(job={self.job!r}, tensors={len(self.tensors)}, kind={self.update_kind!r})"
