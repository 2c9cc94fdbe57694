//! The descriptor channel between a gateway and a function-host process on one node (DESIGN.md
//! §7): a local TCP connection carrying length-prefixed frames, opened by the function host.
//!
//! Framing (all integers little-endian):
//! - every frame is `u32 length ‖ u8 type ‖ body`, `length` counting the type byte and the body,
//!   at most [`MAX_FRAME`];
//! - the host's first frame is `HELLO`: magic `SHCH`, protocol version (`u16`,
//!   [`CHANNEL_VERSION`]), its [`FunctionId`] (`u32`), then (version 2) the job it is for as
//!   `u8 length ‖ UTF-8` (length 0: any job); the gateway answers `WELCOME` (its version) or
//!   `REFUSED` (a reason byte) and closes;
//! - gateway → host: `DESCRIPTOR`, the 208-byte [`UpdateDescriptor`] record; `REGISTER`
//!   (msgpack [`Register`]: a job whose round progress the host reports); `CLOSE` (msgpack
//!   [`CloseRequest`]: take the harvest of a (job, round), sealing it or as a snapshot);
//! - host → gateway: `RELEASE`, the descriptor's release record (the host is done with the
//!   slot's bytes), and `SETTLE`, an update's end (ack, hand back, refuse) as msgpack;
//!   `PROGRESS` (msgpack [`ProgressRecord`]); and the answer to a `CLOSE`: zero or more
//!   `HARVEST_CHUNK` frames (`u64 request ‖ f64 LE accumulator values`, at most
//!   [`HARVEST_CHUNK_VALUES`] values each, in order) then one `HARVEST` frame (msgpack
//!   [`HarvestRecord`]: the partial's weight, count and `first` owners, the number of values
//!   sent, and the updates folded, by stream sequence). A partial aggregate is model-sized, so
//!   it crosses in chunks: neither side ever holds more than one copy of it plus one frame.
//!
//! Nothing read from a socket is trusted: a wrong version, a truncated or oversized frame, an
//! unknown type or a record that does not decode is a typed [`ChannelError`] (its
//! [`ChannelError::kind`] is the bounded metric label), never a panic. On the function-host side
//! [`SegmentCache`] maps the gateway's segments read-only and checks every descriptor against
//! the segment's header and the slot's current generation before anything reads the bytes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_proto::descriptor::{segment_file_name, DescriptorKind, SegmentId, UpdateDescriptor};
use shoal_proto::{ClientId, FunctionId, JobId, RejectReason, RoundId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ingest::ledger::{Feedback, Settle};
use crate::ingest::reject::Refusal;
use crate::metrics::Metrics;
use crate::staging::{Segment, SlotView, DATA_OFFSET};

/// Magic of the `HELLO` frame.
pub const CHANNEL_MAGIC: [u8; 4] = *b"SHCH";
/// The channel protocol version this build speaks.
pub const CHANNEL_VERSION: u16 = 2;
/// Largest frame accepted (type byte and body), in bytes.
pub const MAX_FRAME: u32 = 64 * 1024;

/// Frame type: the host's hello.
pub const HELLO: u8 = 1;
/// Frame type: the gateway's welcome.
pub const WELCOME: u8 = 2;
/// Frame type: the gateway's refusal.
pub const REFUSED: u8 = 3;
/// Frame type: the descriptor.
pub const DESCRIPTOR: u8 = 4;
/// Frame type: the release record.
pub const RELEASE: u8 = 5;
/// Frame type: the settle record.
pub const SETTLE: u8 = 6;
/// Frame type: the register record.
pub const REGISTER: u8 = 7;
/// Frame type: the close request.
pub const CLOSE: u8 = 8;
/// Frame type: the progress record.
pub const PROGRESS: u8 = 9;
/// Frame type: the harvest chunk.
pub const HARVEST_CHUNK: u8 = 10;
/// Frame type: the harvest record.
pub const HARVEST: u8 = 11;

/// Accumulator values per `HARVEST_CHUNK` frame (8 KiB values, 64 KiB: one frame's worth
/// less the type byte and request id).
pub const HARVEST_CHUNK_VALUES: usize = (MAX_FRAME as usize - 1 - 8) / 8;

/// Why a channel frame or connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket failed.
    #[error("descriptor channel I/O: {0}")]
    Io(#[source] std::io::Error),
    /// The peer closed the connection between frames.
    #[error("descriptor channel closed by the peer")]
    Closed,
    /// The peer closed the connection inside a frame.
    #[error("descriptor channel: truncated frame")]
    Truncated,
    /// A frame longer than [`MAX_FRAME`] (or empty).
    #[error("descriptor channel: frame of {0} bytes (1 to {MAX_FRAME} allowed)")]
    FrameLength(u32),
    /// The peer speaks another protocol version.
    #[error("descriptor channel: peer speaks version {theirs}, this process {CHANNEL_VERSION}")]
    WrongVersion {
        /// The peer's version.
        theirs: u16,
    },
    /// A frame that does not decode (bad magic, unknown type, wrong length, bad record).
    #[error("descriptor channel: malformed {what}: {detail}")]
    Malformed {
        /// Which frame.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The gateway refused this host.
    #[error("descriptor channel: the gateway refused the connection ({0})")]
    Refused(&'static str),
    /// The gateway gave up on the host (a harvest not answered within its bound) and ended the
    /// connection itself.
    #[error("descriptor channel: abandoned by the gateway (the host did not answer in time)")]
    Abandoned,
    /// The gateway let the host go (scale to zero, shutdown): its sink was dropped and the
    /// connection ended from this side, the host's cue to exit.
    #[error("descriptor channel: closed by the gateway (host stopped)")]
    Stopped,
}

/// The `Copy` classification of [`ChannelError`]: the label of
/// `shoal_descriptor_channel_errors_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelErrorKind {
    /// [`ChannelError::Io`], [`ChannelError::Closed`], [`ChannelError::Abandoned`] and
    /// [`ChannelError::Stopped`].
    Disconnected,
    /// [`ChannelError::Truncated`].
    Truncated,
    /// [`ChannelError::FrameLength`].
    FrameLength,
    /// [`ChannelError::WrongVersion`].
    WrongVersion,
    /// [`ChannelError::Malformed`].
    Malformed,
    /// [`ChannelError::Refused`].
    Refused,
}

impl ChannelError {
    /// The error's kind.
    pub fn kind(&self) -> ChannelErrorKind {
        match self {
            ChannelError::Io(_) | ChannelError::Closed | ChannelError::Abandoned | ChannelError::Stopped => {
                ChannelErrorKind::Disconnected
            }
            ChannelError::Truncated => ChannelErrorKind::Truncated,
            ChannelError::FrameLength(_) => ChannelErrorKind::FrameLength,
            ChannelError::WrongVersion { .. } => ChannelErrorKind::WrongVersion,
            ChannelError::Malformed { .. } => ChannelErrorKind::Malformed,
            ChannelError::Refused(_) => ChannelErrorKind::Refused,
        }
    }

    fn malformed(what: &'static str, detail: impl Into<String>) -> ChannelError {
        ChannelError::Malformed { what, detail: detail.into() }
    }
}

impl ChannelErrorKind {
    /// Every kind (metric label values).
    pub const ALL: [ChannelErrorKind; 6] = [
        ChannelErrorKind::Disconnected,
        ChannelErrorKind::Truncated,
        ChannelErrorKind::FrameLength,
        ChannelErrorKind::WrongVersion,
        ChannelErrorKind::Malformed,
        ChannelErrorKind::Refused,
    ];

    /// A bounded label.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelErrorKind::Disconnected => "disconnected",
            ChannelErrorKind::Truncated => "truncated",
            ChannelErrorKind::FrameLength => "frame_length",
            ChannelErrorKind::WrongVersion => "wrong_version",
            ChannelErrorKind::Malformed => "malformed",
            ChannelErrorKind::Refused => "refused",
        }
    }

    fn code(self) -> u8 {
        match self {
            ChannelErrorKind::Disconnected => 1,
            ChannelErrorKind::Truncated => 2,
            ChannelErrorKind::FrameLength => 3,
            ChannelErrorKind::WrongVersion => 4,
            ChannelErrorKind::Malformed => 5,
            ChannelErrorKind::Refused => 6,
        }
    }

    fn from_code(c: u8) -> &'static str {
        Self::ALL.iter().find(|k| k.code() == c).map_or("unknown reason", |k| k.as_str())
    }
}

/// Reads one frame: its type and body (the frame was `5 + body.len()` bytes on the wire).
///
/// # Errors
/// [`ChannelError::Closed`] at a clean end between frames; `Truncated`, `FrameLength`, `Io`.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, Vec<u8>), ChannelError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ChannelError::Closed),
        Err(e) => return Err(ChannelError::Io(e)),
    }
    read_exact(r, &mut len[1..]).await?;
    let len = u32::from_le_bytes(len);
    if len == 0 || len > MAX_FRAME {
        return Err(ChannelError::FrameLength(len));
    }
    let mut body = vec![0u8; len as usize];
    read_exact(r, &mut body).await?;
    let kind = body.remove(0);
    Ok((kind, body))
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), ChannelError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ChannelError::Truncated),
        Err(e) => Err(ChannelError::Io(e)),
    }
}

/// Writes one frame of `kind` with `body`, in one `write` (one `sendmsg`, one message for the
/// eBPF sidecar's counters, when the socket takes it whole); returns the frame's size in bytes.
///
/// # Errors
/// [`ChannelError::Io`]; [`ChannelError::FrameLength`] for a body too long.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    body: &[u8],
) -> Result<usize, ChannelError> {
    let len = u32::try_from(body.len() + 1).map_err(|_| ChannelError::FrameLength(u32::MAX))?;
    if len > MAX_FRAME {
        return Err(ChannelError::FrameLength(len));
    }
    let mut frame = Vec::with_capacity(body.len() + 5);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.push(kind);
    frame.extend_from_slice(body);
    w.write_all(&frame).await.map_err(ChannelError::Io)?;
    w.flush().await.map_err(ChannelError::Io)?;
    Ok(frame.len())
}

/// The name of frame type `kind` (a bounded metric label; `unknown` for any other byte).
pub fn frame_name(kind: u8) -> &'static str {
    match kind {
        HELLO => "hello",
        WELCOME => "welcome",
        REFUSED => "refused",
        DESCRIPTOR => "descriptor",
        RELEASE => "release",
        SETTLE => "settle",
        REGISTER => "register",
        CLOSE => "close",
        PROGRESS => "progress",
        HARVEST_CHUNK => "harvest_chunk",
        HARVEST => "harvest",
        _ => "unknown",
    }
}

#[cfg(test)]
fn hello_body(function: FunctionId, version: u16) -> Vec<u8> {
    hello_body_for(function, version, None)
}

fn hello_body_for(function: FunctionId, version: u16, job: Option<&JobId>) -> Vec<u8> {
    let mut b = CHANNEL_MAGIC.to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&function.0.to_le_bytes());
    let job = job.map(JobId::as_str).unwrap_or_default().as_bytes();
    // Job ids are at most 64 bytes (`JobId`'s rule), so the length fits the byte.
    b.push(u8::try_from(job.len()).unwrap_or(0));
    b.extend_from_slice(&job[..job.len().min(255)]);
    b
}

/// What a function host says in its `HELLO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Its function id.
    pub function: FunctionId,
    /// The job it serves (`None`: any job the gateway gives it).
    pub job: Option<JobId>,
}

/// Decodes a `HELLO` frame: the host's function id and job.
///
/// # Errors
/// [`ChannelError::Malformed`] for another frame, a wrong length, magic or job id;
/// [`ChannelError::WrongVersion`] for another protocol version.
pub fn decode_hello(kind: u8, body: &[u8]) -> Result<Hello, ChannelError> {
    if kind != HELLO {
        return Err(ChannelError::malformed("hello", format!("frame type {kind} before the hello")));
    }
    if body.len() < 6 || body[0..4] != CHANNEL_MAGIC {
        return Err(ChannelError::malformed("hello", "not SHCH magic, version and function id"));
    }
    let theirs = u16::from_le_bytes([body[4], body[5]]);
    if theirs != CHANNEL_VERSION {
        return Err(ChannelError::WrongVersion { theirs });
    }
    if body.len() < 11 || body.len() != 11 + body[10] as usize {
        return Err(ChannelError::malformed("hello", "not SHCH magic, version, function id and job"));
    }
    let function = FunctionId(u32::from_le_bytes([body[6], body[7], body[8], body[9]]));
    let job = match &body[11..] {
        [] => None,
        raw => {
            let text =
                std::str::from_utf8(raw).map_err(|e| ChannelError::malformed("hello", e.to_string()))?;
            Some(JobId::new(text).map_err(|e| ChannelError::malformed("hello", e.to_string()))?)
        }
    };
    Ok(Hello { function, job })
}

/// Gateway side of a new connection: reads the host's hello within `timeout` and welcomes it,
/// or tells it why not (a wrong version, garbage), counts the refusal in `metrics`, logs it and
/// returns it.
///
/// # Errors
/// Whatever [`decode_hello`] refuses, and I/O errors; a silent peer is `Truncated`.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<FunctionId, ChannelError> {
    accept_hello(s, timeout, metrics).await.map(|h| h.function)
}

/// [`accept`], returning the whole [`Hello`] (function id and job).
///
/// # Errors
/// As [`accept`].
pub async fn accept_hello<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<Hello, ChannelError> {
    let hello = read_hello(s, timeout, metrics).await?;
    welcome(s).await?;
    Ok(hello)
}

/// The first half of [`accept_hello`]: reads the host's hello within `timeout`, or tells it why
/// not (counted in `metrics`, logged) and returns the refusal. Between this and [`welcome`] the
/// connection is quiet both ways: the moment to register it with the eBPF sidecar.
///
/// # Errors
/// As [`accept`].
pub async fn read_hello<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<Hello, ChannelError> {
    let hello = match tokio::time::timeout(timeout, read_frame(s)).await {
        Ok(r) => r,
        Err(_) => Err(ChannelError::Truncated),
    };
    match hello.and_then(|(kind, body)| decode_hello(kind, &body)) {
        Ok(hello) => Ok(hello),
        Err(e) => {
            refuse(s, &e, metrics).await;
            Err(e)
        }
    }
}

/// Tells a host why its connection is refused (`REFUSED` with `e`'s reason), counts the refusal
/// in `metrics` and logs it.
pub async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, e: &ChannelError, metrics: &Metrics) {
    metrics.channel_error(e.kind());
    tracing::warn!(error = %e, "a function host's connection refused");
    let _ = write_frame(s, REFUSED, &[e.kind().code()]).await;
}

/// The second half of [`accept_hello`]: the `WELCOME` frame; returns its size in bytes.
///
/// # Errors
/// I/O errors.
pub async fn welcome<S: AsyncWrite + Unpin>(s: &mut S) -> Result<usize, ChannelError> {
    write_frame(s, WELCOME, &CHANNEL_VERSION.to_le_bytes()).await
}

/// Function-host side: says hello as `function` and waits for the welcome.
///
/// # Errors
/// [`ChannelError::Refused`] with the gateway's reason; malformed answers; I/O errors.
pub async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    function: FunctionId,
) -> Result<(), ChannelError> {
    hello_for(s, function, None).await
}

/// [`hello`], naming the job the host serves (`None`: any).
///
/// # Errors
/// As [`hello`].
pub async fn hello_for<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    function: FunctionId,
    job: Option<&JobId>,
) -> Result<(), ChannelError> {
    write_frame(s, HELLO, &hello_body_for(function, CHANNEL_VERSION, job)).await?;
    match read_frame(s).await? {
        (WELCOME, b) if b.len() == 2 => Ok(()),
        (REFUSED, b) if b.len() == 1 => Err(ChannelError::Refused(ChannelErrorKind::from_code(b[0]))),
        (kind, _) => Err(ChannelError::malformed("welcome", format!("frame type {kind}"))),
    }
}

/// Sends a descriptor to a function host; returns the frame's size in bytes (as every `send_*`).
///
/// # Errors
/// I/O errors.
pub async fn send_descriptor<W: AsyncWrite + Unpin>(
    w: &mut W,
    d: &UpdateDescriptor,
) -> Result<usize, ChannelError> {
    write_frame(w, DESCRIPTOR, &d.encode()).await
}

/// Decodes a frame a function host received: a descriptor of kind `Update`.
///
/// # Errors
/// [`ChannelError::Malformed`] for another frame type or a record that does not decode.
pub fn decode_descriptor(kind: u8, body: &[u8]) -> Result<UpdateDescriptor, ChannelError> {
    if kind != DESCRIPTOR {
        return Err(ChannelError::malformed("descriptor", format!("frame type {kind}")));
    }
    let d =
        UpdateDescriptor::decode(body).map_err(|e| ChannelError::malformed("descriptor", e.to_string()))?;
    if d.kind != DescriptorKind::Update {
        return Err(ChannelError::malformed("descriptor", "a release record sent to a host"));
    }
    Ok(d)
}

/// How an update ended, on the wire (msgpack, named fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "snake_case")]
enum WireSettle {
    Ack { stream_seq: u64 },
    Nak { stream_seq: u64, delay_ms: u64 },
    Reject { stream_seq: u64, reason: RejectReason, detail: String },
}

/// Sends a function host's release record for the update of descriptor `d` (it is done with
/// the slot's bytes).
///
/// # Errors
/// I/O errors.
pub async fn send_release<W: AsyncWrite + Unpin>(
    w: &mut W,
    d: &UpdateDescriptor,
) -> Result<usize, ChannelError> {
    write_frame(w, RELEASE, &d.release().encode()).await
}

/// Sends how the update at `stream_seq` ended (ack, hand back, refuse).
///
/// # Errors
/// I/O errors.
pub async fn send_settle<W: AsyncWrite + Unpin>(
    w: &mut W,
    stream_seq: u64,
    settle: &Settle,
) -> Result<usize, ChannelError> {
    let wire = match settle {
        Settle::Ack => WireSettle::Ack { stream_seq },
        Settle::Nak(delay) => {
            WireSettle::Nak { stream_seq, delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX) }
        }
        Settle::Reject(r) => WireSettle::Reject { stream_seq, reason: r.reason, detail: r.detail.clone() },
    };
    write_frame(w, SETTLE, &shoal_proto::encode(&wire)).await
}

/// Decodes a frame a gateway received from a function host into ledger feedback.
///
/// # Errors
/// [`ChannelError::Malformed`] for another frame type or a record that does not decode.
pub fn decode_feedback(kind: u8, body: &[u8]) -> Result<Feedback, ChannelError> {
    match kind {
        RELEASE => {
            let d = UpdateDescriptor::decode(body)
                .map_err(|e| ChannelError::malformed("release", e.to_string()))?;
            if d.kind != DescriptorKind::Release {
                return Err(ChannelError::malformed("release", "an update record sent back"));
            }
            Ok(Feedback::Release { stream_seq: d.stream_seq })
        }
        SETTLE => {
            let wire: WireSettle = shoal_proto::decode("settle", body)
                .map_err(|e| ChannelError::malformed("settle", e.to_string()))?;
            Ok(match wire {
                WireSettle::Ack { stream_seq } => Feedback::Settle { stream_seq, settle: Settle::Ack },
                WireSettle::Nak { stream_seq, delay_ms } => {
                    Feedback::Settle { stream_seq, settle: Settle::Nak(Duration::from_millis(delay_ms)) }
                }
                WireSettle::Reject { stream_seq, reason, detail } => {
                    Feedback::Settle { stream_seq, settle: Settle::Reject(Refusal::new(reason, detail)) }
                }
            })
        }
        other => Err(ChannelError::malformed("feedback", format!("frame type {other}"))),
    }
}

/// `REGISTER`: the host reports the round progress of `job` (incarnation `incarnation`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// Job.
    pub job: JobId,
    /// Its incarnation.
    pub incarnation: u64,
}

/// `CLOSE`: take the harvest of (job, round); `seal` closes the round on the host for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseRequest {
    /// Matches the answer's [`HarvestRecord::request`].
    pub request: u64,
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// Close the round for good (else a snapshot).
    pub seal: bool,
}

/// `PROGRESS`: updates accepted for (job, round) on the host so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// Updates accepted.
    pub accepted: u32,
}

/// One update a harvest covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HarvestedUpdate {
    /// Sender.
    pub client: ClientId,
    /// `num_examples`.
    pub num_examples: u64,
    /// Its message's stream sequence.
    pub stream_seq: u64,
    /// The job runs an asynchronous mode.
    pub asynchronous: bool,
    /// The host kept the bytes (whole-cohort strategies): the gateway's own view of the slot
    /// stands in for it.
    pub kept: bool,
    /// The coefficient the host folded it with (0 when kept).
    #[serde(default)]
    pub fold_weight: f64,
    /// Model versions between its base and the round's base.
    #[serde(default)]
    pub staleness: u64,
}

/// `HARVEST`: the answer to a [`CloseRequest`], after its `HARVEST_CHUNK` frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HarvestRecord {
    /// The request answered.
    pub request: u64,
    /// Accumulator values sent in the chunks (0: no partial).
    pub values: u64,
    /// The partial's total weight.
    pub total_weight: f64,
    /// Updates the partial folded.
    pub count: u64,
    /// Owner of each `first` tensor.
    pub first_owners: Vec<Option<ClientId>>,
    /// The updates the harvest covers.
    pub held: Vec<HarvestedUpdate>,
    /// How long ago the round's last update reached the host, in ms (`None`: none did).
    pub last_fold_age_ms: Option<u64>,
}

/// Sends a control record (`REGISTER` or `CLOSE`) to a host.
///
/// # Errors
/// I/O errors.
pub async fn send_register<W: AsyncWrite + Unpin>(w: &mut W, r: &Register) -> Result<usize, ChannelError> {
    write_frame(w, REGISTER, &shoal_proto::encode(r)).await
}

/// Sends a `CLOSE` request to a host.
///
/// # Errors
/// I/O errors.
pub async fn send_close<W: AsyncWrite + Unpin>(w: &mut W, r: &CloseRequest) -> Result<usize, ChannelError> {
    write_frame(w, CLOSE, &shoal_proto::encode(r)).await
}

/// Sends a `PROGRESS` record to the gateway.
///
/// # Errors
/// I/O errors.
pub async fn send_progress<W: AsyncWrite + Unpin>(
    w: &mut W,
    p: &ProgressRecord,
) -> Result<usize, ChannelError> {
    write_frame(w, PROGRESS, &shoal_proto::encode(p)).await
}

/// Sends a harvest: its accumulator values in chunks, then the record (`record.values` is set
/// from `values`).
///
/// # Errors
/// I/O errors.
pub async fn send_harvest<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut record: HarvestRecord,
    values: &[f64],
) -> Result<(), ChannelError> {
    let mut frame = Vec::with_capacity(8 + HARVEST_CHUNK_VALUES * 8);
    for chunk in values.chunks(HARVEST_CHUNK_VALUES) {
        frame.clear();
        frame.extend_from_slice(&record.request.to_le_bytes());
        frame.extend_from_slice(bytemuck::cast_slice(chunk));
        write_frame(w, HARVEST_CHUNK, &frame).await?;
    }
    record.values = values.len() as u64;
    write_frame(w, HARVEST, &shoal_proto::encode(&record)).await?;
    Ok(())
}

/// What a host sends the gateway, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum HostFrame {
    /// `RELEASE` or `SETTLE`: for the ledger.
    Feedback(Feedback),
    /// `PROGRESS`.
    Progress(ProgressRecord),
    /// `HARVEST_CHUNK`: (request, values).
    HarvestChunk(u64, Vec<f64>),
    /// `HARVEST`.
    Harvest(HarvestRecord),
}

/// Decodes any frame a gateway receives from a function host.
///
/// # Errors
/// [`ChannelError::Malformed`] for an unknown type or a record that does not decode (a chunk
/// that is not a request id and whole `f64`s, a non-finite value).
pub fn decode_host_frame(kind: u8, body: &[u8]) -> Result<HostFrame, ChannelError> {
    match kind {
        PROGRESS => shoal_proto::decode("progress", body)
            .map(HostFrame::Progress)
            .map_err(|e| ChannelError::malformed("progress", e.to_string())),
        HARVEST => shoal_proto::decode("harvest", body)
            .map(HostFrame::Harvest)
            .map_err(|e| ChannelError::malformed("harvest", e.to_string())),
        HARVEST_CHUNK => {
            if body.len() < 8 || !(body.len() - 8).is_multiple_of(8) {
                return Err(ChannelError::malformed("harvest chunk", format!("{} bytes", body.len())));
            }
            let request = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
            let values: Vec<f64> = body[8..]
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect();
            if values.iter().any(|v| v.is_nan()) {
                return Err(ChannelError::malformed("harvest chunk", "NaN in the accumulators"));
            }
            Ok(HostFrame::HarvestChunk(request, values))
        }
        _ => decode_feedback(kind, body).map(HostFrame::Feedback),
    }
}

/// What a gateway sends a host, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayFrame {
    /// `DESCRIPTOR`.
    Descriptor(UpdateDescriptor),
    /// `REGISTER`.
    Register(Register),
    /// `CLOSE`.
    Close(CloseRequest),
}

/// Decodes any frame a function host receives from its gateway.
///
/// # Errors
/// [`ChannelError::Malformed`] for an unknown type or a record that does not decode.
pub fn decode_gateway_frame(kind: u8, body: &[u8]) -> Result<GatewayFrame, ChannelError> {
    match kind {
        REGISTER => shoal_proto::decode("register", body)
            .map(GatewayFrame::Register)
            .map_err(|e| ChannelError::malformed("register", e.to_string())),
        CLOSE => shoal_proto::decode("close", body)
            .map(GatewayFrame::Close)
            .map_err(|e| ChannelError::malformed("close", e.to_string())),
        _ => decode_descriptor(kind, body).map(GatewayFrame::Descriptor),
    }
}

/// The gateway's segments, mapped read-only by a function host on first use, and every
/// descriptor checked against them.
#[derive(Debug)]
pub struct SegmentCache {
    dir: PathBuf,
    segments: HashMap<(JobId, SegmentId), Arc<Segment>>,
}

impl SegmentCache {
    /// Segments under the node's shm directory `dir` (`<shm_dir>/<node>`).
    pub fn new(dir: PathBuf) -> SegmentCache {
        SegmentCache { dir, segments: HashMap::new() }
    }

    /// The read-only view of the slot `d` names, after checking that the segment exists and its
    /// header is valid, that the offset and length are the slot's, and that the slot is at the
    /// descriptor's generation (not leased again since).
    ///
    /// # Errors
    /// [`crate::Error::Io`] (no such segment), [`crate::Error::Segment`] (a bad header),
    /// [`crate::Error::SlotOutOfRange`], [`crate::Error::StaleSlot`], or
    /// [`crate::Error::Decode`] when offset or length are not the slot's.
    pub fn view(&mut self, d: &UpdateDescriptor) -> crate::Result<SlotView> {
        let key = (d.job.clone(), d.segment);
        let seg = match self.segments.get(&key) {
            Some(s) => Arc::clone(s),
            None => {
                let path = self.dir.join(segment_file_name(&d.job, d.segment));
                let s = Arc::new(Segment::open_read_only(&path)?);
                self.segments.insert(key, Arc::clone(&s));
                s
            }
        };
        let h = seg.header();
        let index = d.slot as u64;
        let expected = (DATA_OFFSET as u64).checked_add(index.saturating_mul(h.slot_bytes));
        if index < h.slot_count && (expected != Some(d.offset) || d.length != h.slot_bytes) {
            return Err(crate::Error::Decode {
                what: "update descriptor",
                detail: format!("offset {} / length {} are not slot {index}'s", d.offset, d.length),
            });
        }
        seg.view(d.slot as usize, d.generation)
    }

    /// Forgets (unmaps) the segments of `job`, and any other whose file is gone or replaced: a
    /// descriptor naming them maps the file again and validates its header anew.
    pub fn forget(&mut self, job: &JobId) {
        self.segments.retain(|(j, _), _| j != job);
    }
}

#[cfg(test)]
mod tests;
