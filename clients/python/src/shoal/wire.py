"""The byte-level contract (docs/protocol.md): subjects, KV keys, object names, update headers,
message ids and the control-message envelope. Pure functions, no I/O.

Every NATS subject the SDK uses is built here and nowhere else.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Mapping

import msgpack

#: Version of the control-message envelope ``{"v": 1, "body": ...}``.
PROTOCOL_VERSION = 1
#: Default subject prefix.
DEFAULT_PREFIX = "shoal"
#: KV bucket holding each job's spec and state.
JOBS_BUCKET = "shoal-jobs"
#: Object store holding the committed global models.
MODELS_BUCKET = "shoal-models"
#: Bytes of ``max_payload`` kept for an update message's headers when a job spec does not publish
#: ``inline_limit_bytes`` (decision 1: ``inline_limit_bytes`` = ``max_payload`` - 4096).
HEADER_ALLOWANCE = 4096
#: Default upload chunk when a spec does not publish ``chunk_bytes``: min(1 MiB, inline limit).
DEFAULT_CHUNK_BYTES = 1 << 20

HDR_ROUND = "Shoal-Round"
HDR_BASE_VERSION = "Shoal-Base-Version"
HDR_NUM_EXAMPLES = "Shoal-Num-Examples"
HDR_KIND = "Shoal-Kind"
HDR_DIGEST = "Shoal-Digest"
HDR_UPLOAD_CHUNKS = "Shoal-Upload-Chunks"
HDR_UPLOAD_BYTES = "Shoal-Upload-Bytes"
HDR_MSG_ID = "Nats-Msg-Id"
HDR_ERROR = "Shoal-Error"

#: Ids (jobs, clients) are NATS subject tokens: 1-64 of ``[A-Za-z0-9_-]``.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NONCE = re.compile(r"[A-Za-z0-9]{1,16}")
_NONCE_ALPHABET = string.ascii_letters + string.digits


class InvalidId(ValueError):
    """A job id, client id or prefix that is not 1-64 characters of ``[A-Za-z0-9_-]``."""


def check_id(what: str, value: str) -> str:
    """Returns ``value`` if it is a valid id (a safe subject token), else raises :class:`InvalidId`."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidId(f"{what} {value!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return value


@dataclass(frozen=True)
class Subjects:
    """Subject builder for one prefix (a single subject token, default ``shoal``)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_id("prefix", self.prefix)

    def update(self, job: str, client: str) -> str:
        """``<p>.<job>.update.<client>``: where a client publishes its update messages."""
        return f"{self.prefix}.{job}.update.{client}"

    def upload_chunk(self, job: str, client: str, round_: int, index: int) -> str:
        """``<p>.<job>.upload.<client>.<round>.<i>``: chunk ``i`` (0-based) of an upload."""
        return f"{self.prefix}.{job}.upload.{client}.{round_}.{index}"

    def round_events(self, job: str) -> str:
        """``<p>.<job>.round``: round events (opened, closed, job ended)."""
        return f"{self.prefix}.{job}.round"

    def rejected(self, job: str, client: str) -> str:
        """``<p>.<job>.rejected.<client>``: rejection notices for one client."""
        return f"{self.prefix}.{job}.rejected.{client}"

    def reward(self, job: str, client: str) -> str:
        """``<p>.<job>.reward.<client>``: request/reply, the client's personal reward (RFFL)."""
        return f"{self.prefix}.{job}.reward.{client}"


def inbox_prefix(client: str) -> str:
    """The reply inbox prefix of a client: ``_INBOX_<client>`` (the only inbox it may subscribe to)."""
    return f"_INBOX_{check_id('client id', client)}"


def kv_stream(bucket: str) -> str:
    """The stream behind KV bucket ``bucket``: ``KV_<bucket>``."""
    return f"KV_{bucket}"


def object_stream(bucket: str) -> str:
    """The stream behind object store ``bucket``: ``OBJ_<bucket>``."""
    return f"OBJ_{bucket}"


def job_spec_key(job: str) -> str:
    """KV key of a job's spec: ``<job>.spec``."""
    return f"{job}.spec"


def job_state_key(job: str) -> str:
    """KV key of a job's state: ``<job>.state``."""
    return f"{job}.state"


def kv_direct_get_subject(bucket: str, key: str) -> str:
    """Direct get of a KV key's last value: ``$JS.API.DIRECT.GET.KV_<b>.$KV.<b>.<key>``."""
    return f"$JS.API.DIRECT.GET.{kv_stream(bucket)}.$KV.{bucket}.{key}"


def direct_get_subject(stream: str) -> str:
    """Direct get with a JSON request body: ``$JS.API.DIRECT.GET.<stream>``."""
    return f"$JS.API.DIRECT.GET.{stream}"


def direct_get_last_subject(stream: str, subject: str) -> str:
    """Direct get of the last message on ``subject``: ``$JS.API.DIRECT.GET.<stream>.<subject>``."""
    return f"$JS.API.DIRECT.GET.{stream}.{subject}"


def model_object(job: str, version: int) -> str:
    """Object name of a committed global model in ``shoal-models``: ``<job>/<version>``."""
    return f"{job}/{version}"


def object_meta_subject(bucket: str, name: str) -> str:
    """Subject of an object's metadata: ``$O.<bucket>.M.<base64url(name), padded>``."""
    encoded = base64.urlsafe_b64encode(name.encode()).decode()
    return f"$O.{bucket}.M.{encoded}"


def object_chunk_subject(bucket: str, nuid: str) -> str:
    """Subject of an object's chunks: ``$O.<bucket>.C.<nuid>``."""
    return f"$O.{bucket}.C.{nuid}"


def object_digest(data: bytes) -> str:
    """The object store's digest of ``data``: ``SHA-256=<base64url(sha256), padded>``."""
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


# ---------------------------------------------------------------------------------------------
# Update headers and message ids
# ---------------------------------------------------------------------------------------------


def transport_inline() -> str:
    """The ``transport`` of an inline update in the message-id input."""
    return "inline"


def transport_upload(chunks: int, total_bytes: int) -> str:
    """The ``transport`` of an uploaded update: ``upload:<chunks>:<bytes>``."""
    return f"upload:{chunks}:{total_bytes}"


def update_msg_id(
    job: str,
    round_: int,
    client: str,
    *,
    base_version: int,
    num_examples: int,
    kind: str,
    transport: str,
    payload_sha256_hex: str,
    nonce: str | None = None,
) -> str:
    """The ``Nats-Msg-Id`` of an update (decision 3 of docs/protocol.md).

    ``<job>.<round>.<client>.<h>[.<nonce>]`` where ``<h>`` is the first 16 lowercase hex digits of
    SHA-256 over ``"shoal-msg-id/1\\n" + round + "\\n" + base_version + "\\n" + num_examples +
    "\\n" + kind + "\\n" + transport + "\\n" + payload_sha256_hex + "\\n"`` (decimal numbers,
    UTF-8), so any change of a header that matters, of the path or of the bytes gives a new id.
    """
    material = (
        f"shoal-msg-id/1\n{round_}\n{base_version}\n{num_examples}\n{kind}\n{transport}\n"
        f"{payload_sha256_hex}\n"
    )
    h = hashlib.sha256(material.encode()).hexdigest()[:16]
    msg_id = f"{job}.{round_}.{client}.{h}"
    if nonce is not None:
        if not _NONCE.fullmatch(nonce):
            raise ValueError(f"nonce {nonce!r} must be 1-16 characters of [A-Za-z0-9]")
        msg_id += f".{nonce}"
    return msg_id


def fresh_nonce(length: int = 16) -> str:
    """A random nonce for a message id (16 of ``[A-Za-z0-9]``, about 95 bits)."""
    return "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(length))


def update_headers(
    *,
    msg_id: str,
    round_: int,
    base_version: int,
    num_examples: int,
    kind: str,
    upload: tuple[int, int, str] | None = None,
) -> dict[str, str]:
    """The headers of an update message, in the order the SDK sends them.

    ``upload`` is ``(chunks, total_bytes, payload_sha256_hex)`` for the upload path.
    """
    h = {
        HDR_MSG_ID: msg_id,
        HDR_ROUND: str(round_),
        HDR_BASE_VERSION: str(base_version),
        HDR_NUM_EXAMPLES: str(num_examples),
        HDR_KIND: kind,
    }
    if upload is not None:
        chunks, total, digest = upload
        h[HDR_UPLOAD_CHUNKS] = str(chunks)
        h[HDR_UPLOAD_BYTES] = str(total)
        h[HDR_DIGEST] = f"sha256:{digest}"
    return h


def header_block_size(headers: Mapping[str, str]) -> int:
    """Bytes a NATS header block takes on the wire (``NATS/1.0\\r\\n``, ``Name: value\\r\\n`` per
    header, a closing ``\\r\\n``). Headers count against the server's ``max_payload`` together
    with the payload."""
    size = len(b"NATS/1.0\r\n") + 2
    for k, v in headers.items():
        size += len(k.encode()) + 2 + len(v.encode()) + 2
    return size


def chunk_count(total: int, chunk_bytes: int) -> int:
    """Chunks of an upload of ``total`` bytes: ``ceil(total / chunk_bytes)``, at least 1."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    return max(1, -(-total // chunk_bytes))


# ---------------------------------------------------------------------------------------------
# Envelope
# ---------------------------------------------------------------------------------------------


class DecodeError(ValueError):
    """Bytes that are not a valid control message (not msgpack, not ``{v, body}``, unknown
    version, or a body without the fields its type needs)."""


def pack(obj: Any) -> bytes:
    """msgpack as Rust's rmp-serde writes Shoal's messages: maps with string keys in the order
    given, strings as str (not bin), integers in their smallest encoding, floats as float 64."""
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False, strict_types=False)


def encode_envelope(body: Any) -> bytes:
    """The envelope ``{"v": 1, "body": body}`` as msgpack (``body`` already in wire form)."""
    return pack({"v": PROTOCOL_VERSION, "body": body})


def decode_envelope(what: str, data: bytes) -> Any:
    """The body of an envelope, checked: msgpack, a map with ``v`` = 1 and ``body``."""
    try:
        env = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise DecodeError(f"cannot decode {what}: {e}") from e
    if not isinstance(env, dict) or "v" not in env or "body" not in env:
        raise DecodeError(f"cannot decode {what}: not a {{v, body}} envelope")
    if env["v"] != PROTOCOL_VERSION:
        raise DecodeError(f"cannot decode {what}: unknown protocol version {env['v']}")
    return env["body"]
