//! Shoal's wire contract, shared by nodes, SDKs and the operator (DESIGN.md §3–4): plain data
//! and the functions that encode it, with no I/O and no async runtime. Clients in any language
//! follow the same contract (docs/protocol.md); the golden vectors in `proto/vectors/` are its
//! normative examples.
//!
//! Modules:
//! - [`ids`]: identifiers and units (`JobId`, `ClientId`, `NodeId`, `RoundId`, `ModelVersion`,
//!   `Staleness`, `FunctionId`, `Tier`, collection, exchange and process ids), validated on
//!   every path in.
//! - [`manifest`]: dtypes, tensor specs, aggregation policies, the model manifest and its slot
//!   layout.
//! - [`spec`]: the job spec (strategy, round policy, server optimizer, limits) and its
//!   structural validation.
//! - [`subjects`]: every NATS subject, stream, bucket, KV key and object name.
//! - [`headers`]: update headers and their grammar.
//! - [`envelope`]: the versioned msgpack envelope of control messages, and frames.
//! - [`messages`]: public messages (job state, round events, rejection notices and reasons).
//! - [`cluster`]: trusted messages between nodes (leases, claims, progress, collections,
//!   commit records, the sharded exchange).
//! - [`twophase`]: the per-client scalars and decisions of the two-phase protocol that runs
//!   RFFL and Bristle across nodes without moving updates.
//! - [`descriptor`]: fixed-layout records of one node's processes (segment header, update
//!   descriptor and slot release).
//! - [`permissions`]: a client's least NATS permissions.
//! - [`config`]: a node's configuration, its defaults, limits and timings.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod config;
pub mod descriptor;
pub mod envelope;
pub mod headers;
pub mod ids;
pub mod manifest;
pub mod messages;
pub mod permissions;
pub mod spec;
pub mod subjects;
pub mod twophase;

pub use envelope::{decode, encode, DecodeError, PROTOCOL_VERSION};
pub use ids::{
    ClientId, CollectId, ExchangeId, FunctionId, InstanceId, InvalidId, JobId, ModelVersion, NodeId, RoundId,
    Staleness, Tier,
};
pub use manifest::{AggregationPolicy, DType, ManifestError, ModelManifest, TensorSlot, TensorSpec};
pub use messages::{
    AggregationErrorKind, JobPhase, JobState, RejectNotice, RejectReason, RoundEvent, RoundOutcome,
};
pub use spec::{JobSpec, RoundPolicy, RoundRule, SpecError, StrategySpec, UpdateKind};
