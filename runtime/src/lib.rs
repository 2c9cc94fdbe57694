//! The Shoal node library: the gateway, shared-memory staging, the function host and its
//! aggregator actors, the hierarchy and the round commits. The `shoal` binary (crate
//! `shoal-cli`) runs it; the wire contract is `shoal_proto`, the maths `shoal_functions`, NATS
//! access `shoal_client`.
//!
//! One client update's path through the folders (ARCHITECTURE.md tells it file by file):
//! [`ingest`] pulls it from JetStream, validates it and stages it into a [`staging`] slot →
//! [`host`] routes its descriptor to an on-demand aggregator actor that folds it → [`cluster`]
//! collects the leaves' partials at the job's top, commits the model ([`jobs`]) and the leaves
//! ack the round.
//!
//! Folders and modules:
//! - [`node`]: assembling a node and shutting it down; [`node::capacity`], the jobs it serves.
//! - [`nats`]: the node's NATS handles and its object-store transfers.
//! - [`jobs`]: the node's view of the jobs ([`jobs::JobDirectory`]), kept fresh by a KV watch.
//! - [`ingest`]: the gateway: JetStream pull consumer, validation, claims and staging;
//!   [`ingest::reject`], the one rejection path; [`ingest::claims`], the cluster-wide claims.
//! - [`staging`]: shared-memory segments and the slot pool (all mapping `unsafe` lives here).
//! - [`host`]: the actix function host and its aggregator actors.
//! - [`cluster`]: leases ([`cluster::lease`]), the leaf ([`cluster::leaf`]), the
//!   coordinate-sharded exchange ([`cluster::exchange`]) and the top ([`cluster::top`]).
//! - [`dataplane`]: the descriptor data plane: `--ebpf off|auto|required`, the eBPF sidecar's
//!   loading, connection registration, counters and kill switch.
//! - [`metrics`]: Prometheus metrics; [`http`], the `/metrics` `/healthz` `/readyz` listener.
//! - [`clock`]: wall-clock milliseconds.
//! - [`error`]: the runtime's error type.

#![deny(unsafe_code)]

pub mod clock;
pub mod cluster;
pub mod dataplane;
pub mod error;
pub mod host;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod metrics;
pub mod nats;
pub mod node;
// All mapping `unsafe` of the runtime lives in `staging` (STYLE.md), with `// SAFETY:` on every block.
#[allow(unsafe_code)]
pub mod staging;

pub use error::{Error, RejectReason, Result};
