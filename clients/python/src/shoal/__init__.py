"""Shoal's Python SDK: take part in federated-learning jobs aggregated by Shoal over NATS JetStream.

Quick start (a PyTorch or numpy client in a few lines): :func:`train_rounds`. The building blocks:

- :class:`ShoalClient` (asyncio): connect with least permissions, read the job's spec and state,
  fetch global models, publish updates (inline or through the job's upload stream), wait for a
  round's outcome with a typed exception per rejection reason (:mod:`shoal.errors`);
- :mod:`shoal.tensors`: numpy arrays <-> safetensors with the manifest's dtypes (bfloat16 via
  ml-dtypes, integers exact), deltas;
- :mod:`shoal.torch`: ``state_dict`` <-> the manifest (needs ``shoal-fl[torch]``);
- :mod:`shoal.messages` and :mod:`shoal.wire`: the wire contract (docs/protocol.md).
"""

from .client import PublishResult, RoundResult, ShoalClient, Timings, tls_context
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
    UpdateRejected,
    UpdateTooLarge,
    UploadQuotaFull,
)
from .messages import (
    AggregationFailed,
    Committed,
    JobPhase,
    JobSpec,
    JobState,
    QuorumNotMet,
    RejectNotice,
    RoundClosed,
    RoundOpened,
    TensorSpec,
)
from .messages import JobEnded as JobEndedEvent
from .tensors import TensorMismatch, from_safetensors, to_safetensors
from .training import NumpyModel, train_rounds, train_rounds_async

__version__ = "0.1.0"

__all__ = [
    "AggregationFailed",
    "AuthenticationFailed",
    "Committed",
    "JobEnded",
    "JobEndedEvent",
    "JobPhase",
    "JobSpec",
    "JobState",
    "ModelNotReady",
    "ModelUnavailable",
    "NotProvisioned",
    "NumpyModel",
    "PermissionDenied",
    "ProtocolError",
    "PublishResult",
    "QuorumNotMet",
    "RejectNotice",
    "RoundClosed",
    "RoundOpened",
    "RoundResult",
    "ShoalClient",
    "ShoalError",
    "TensorMismatch",
    "TensorSpec",
    "Timeout",
    "Timings",
    "UnknownJob",
    "UpdateRejected",
    "UpdateTooLarge",
    "UploadQuotaFull",
    "from_safetensors",
    "tls_context",
    "to_safetensors",
    "train_rounds",
    "train_rounds_async",
]
