//! The runtime's error type, with a `Copy` kind for callers that branch on it and for bounded
//! metric labels. NATS, shared-memory and input problems are all values here: nothing in the
//! runtime panics on them.

use std::time::Duration;

pub use shoal_proto::RejectReason;

/// Result alias for the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runtime errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A NATS or JetStream operation failed.
    #[error("NATS {op} failed: {source}")]
    Nats {
        /// What was attempted.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An SDK operation (connecting, provisioning, the job store, objects) failed.
    #[error(transparent)]
    Client(#[from] shoal_client::Error),
    /// The job does not exist (or this node has not seen it).
    #[error("job {0} does not exist")]
    UnknownJob(String),
    /// A job spec failed validation.
    #[error(transparent)]
    Spec(#[from] shoal_proto::SpecError),
    /// The node's configuration cannot work.
    #[error("invalid node configuration: {0}")]
    Config(#[from] shoal_proto::config::ConfigError),
    /// Aggregation maths failed.
    #[error(transparent)]
    Functions(#[from] shoal_functions::Error),
    /// A stored or received message (job state, partial, exchange message) could not be decoded.
    #[error("cannot decode {what}: {detail}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// Decoder message.
        detail: String,
    },
    /// A shared-memory segment's header is invalid (wrong magic, version or lengths).
    #[error("shared memory: {0}")]
    Segment(#[from] shoal_proto::descriptor::LayoutError),
    /// A slot index beyond its segment.
    #[error("shared memory: slot {index} out of range (the segment has {slots})")]
    SlotOutOfRange {
        /// The index asked for.
        index: usize,
        /// Slots in the segment.
        slots: u64,
    },
    /// A descriptor names an earlier lease of its slot (the slot was leased again since).
    #[error("shared memory: slot {index} is at generation {current}, the descriptor names {generation}")]
    StaleSlot {
        /// The slot.
        index: usize,
        /// The descriptor's generation.
        generation: u32,
        /// The slot's current generation.
        current: u32,
    },
    /// Local I/O (shared-memory files and directories).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A job needs more shared memory than the node's budget (`--shm-budget-mib`): its update
    /// slot is larger than the budget, or a whole-cohort round's updates do not fit in it.
    #[error(
        "the job needs {needed} shared-memory slot(s) of {slot_bytes} bytes ({}), but this node's \
         shared-memory budget of {} (--shm-budget-mib) holds {fits}",
        mib(*slot_bytes as u64 * *needed as u64),
        mib(*budget as u64)
    )]
    ShmBudget {
        /// Bytes per update slot (the model's staged size).
        slot_bytes: usize,
        /// Slots the job needs on one node at once (1, or a whole-cohort round's updates).
        needed: usize,
        /// Slots the budget holds (segment headers counted).
        fits: usize,
        /// The budget, bytes.
        budget: usize,
    },
    /// Another live process uses this node id.
    #[error(
        "another process of node {0} is running and renewing its lease; give each node process its own --node-id"
    )]
    NodeBusy(shoal_proto::NodeId),
    /// Waiting exceeded its timeout.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// A node's answer in a two-phase exchange (RFFL, Bristle) was refused: from another process
    /// than the one that sent its partial, for other updates than that partial listed, or the
    /// node went away between the phases. Nothing of it is folded; the top collects again.
    #[error("two-phase answer of node {node} refused: {detail}")]
    TwoPhase {
        /// The node.
        node: shoal_proto::NodeId,
        /// Why.
        detail: String,
    },
    /// A part of the node (the function host, a job's top) stopped while another waited for it;
    /// the node is shutting down.
    #[error("the {0} of this node is gone")]
    Gone(&'static str),
    /// The eBPF sidecar refused (`--ebpf required`: it cannot load or attach here, with what is
    /// missing), or a descriptor channel could not be registered with it.
    #[error("eBPF sidecar: {source} ({})", source.diagnosis())]
    Ebpf {
        /// The sidecar's error.
        #[source]
        source: shoal_ebpf::Error,
    },
    /// A function host said it is function 0, which is never assigned (the eBPF counters use 0
    /// for connections not registered yet).
    #[error("function id 0 is not a function host's id")]
    FunctionIdZero,
}

/// The `Copy` classification of [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// See [`Error::Nats`].
    Nats,
    /// See [`Error::Client`].
    Client,
    /// See [`Error::UnknownJob`].
    UnknownJob,
    /// See [`Error::Spec`].
    Spec,
    /// See [`Error::Config`].
    Config,
    /// See [`Error::Functions`].
    Functions,
    /// See [`Error::Decode`].
    Decode,
    /// See [`Error::Segment`].
    Segment,
    /// See [`Error::SlotOutOfRange`].
    SlotOutOfRange,
    /// See [`Error::StaleSlot`].
    StaleSlot,
    /// See [`Error::Io`].
    Io,
    /// See [`Error::ShmBudget`].
    ShmBudget,
    /// See [`Error::NodeBusy`].
    NodeBusy,
    /// See [`Error::Timeout`].
    Timeout,
    /// See [`Error::TwoPhase`].
    TwoPhase,
    /// See [`Error::Gone`].
    Gone,
    /// See [`Error::Ebpf`] and [`Error::FunctionIdZero`].
    Ebpf,
}

impl Error {
    /// Wraps a NATS error.
    pub fn nats(op: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Nats { op, source: Box::new(e) }
    }

    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Nats { .. } => ErrorKind::Nats,
            Error::Client(_) => ErrorKind::Client,
            Error::UnknownJob(_) => ErrorKind::UnknownJob,
            Error::Spec(_) => ErrorKind::Spec,
            Error::Config(_) => ErrorKind::Config,
            Error::Functions(_) => ErrorKind::Functions,
            Error::Decode { .. } => ErrorKind::Decode,
            Error::Segment(_) => ErrorKind::Segment,
            Error::SlotOutOfRange { .. } => ErrorKind::SlotOutOfRange,
            Error::StaleSlot { .. } => ErrorKind::StaleSlot,
            Error::Io { .. } => ErrorKind::Io,
            Error::ShmBudget { .. } => ErrorKind::ShmBudget,
            Error::NodeBusy(_) => ErrorKind::NodeBusy,
            Error::Timeout(..) => ErrorKind::Timeout,
            Error::TwoPhase { .. } => ErrorKind::TwoPhase,
            Error::Gone(_) => ErrorKind::Gone,
            Error::Ebpf { .. } | Error::FunctionIdZero => ErrorKind::Ebpf,
        }
    }
}

impl ErrorKind {
    /// A bounded label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Nats => "nats",
            ErrorKind::Client => "client",
            ErrorKind::UnknownJob => "unknown_job",
            ErrorKind::Spec => "spec",
            ErrorKind::Config => "config",
            ErrorKind::Functions => "functions",
            ErrorKind::Decode => "decode",
            ErrorKind::Segment => "segment",
            ErrorKind::SlotOutOfRange => "slot_out_of_range",
            ErrorKind::StaleSlot => "stale_slot",
            ErrorKind::Io => "io",
            ErrorKind::ShmBudget => "shm_budget",
            ErrorKind::NodeBusy => "node_busy",
            ErrorKind::Timeout => "timeout",
            ErrorKind::TwoPhase => "two_phase",
            ErrorKind::Gone => "gone",
            ErrorKind::Ebpf => "ebpf",
        }
    }
}

/// `bytes` in MiB with one decimal (`12.5 MiB`), for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

impl From<shoal_proto::DecodeError> for Error {
    fn from(e: shoal_proto::DecodeError) -> Self {
        Error::Decode { what: e.what, detail: e.detail }
    }
}
