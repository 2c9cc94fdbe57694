//! Shoal's node runtime, client SDK and the `shoal` command.
//!
//! One client update's path through these modules (ARCHITECTURE.md tells it file by file):
//! [`client`] publishes it → [`gateway`] pulls, validates and stages it into a [`shm`] slot →
//! [`host`] routes its descriptor to an on-demand `Aggregator` actor that folds it →
//! [`coordinator`] closes the round, commits the model ([`jobs`]) and acks the round.
//!
//! Modules:
//! - [`subjects`]: every NATS subject, stream, bucket, key and object name.
//! - [`protocol`]: update headers and the versioned msgpack control messages (job state, round
//!   events, rejection notices).
//! - [`auth`]: NATS credentials and TLS, the least-privilege permissions of a client, the
//!   nats-server `authorization` block generator, permission-violation reporting.
//! - [`infra`]: connecting to NATS (credentials, TLS) and creating the JetStream resources
//!   idempotently.
//! - [`jobs`]: job creation, job state compare-and-set, model store, the in-process job directory.
//! - [`shm`]: shared-memory segments and the slot pool (all mapping `unsafe` lives here).
//! - [`gateway`]: the JetStream pull consumer, validation and staging.
//! - [`claims`]: the cluster-wide claim that makes one node stage each (job, round, client).
//! - [`host`]: the actix function host and its `Aggregator` actors.
//! - [`coordinator`]: the per-job round loop (sync policy, quorum, deadline, commit, acks).
//! - [`reject`]: the one rejection path (metrics, log-once, client notice, terminate) and acks.
//! - [`metrics`]: Prometheus metrics, served over NATS request/reply.
//! - [`node`]: assembling a node and shutting it down.
//! - [`capacity`]: the jobs a node serves (`--max-jobs`) and the ones waiting for a slot.
//! - [`client`]: the Rust client SDK.
//! - [`objects`]: object-store reads and writes that need no consumer (least permissions).
//! - [`sim`]: the digits dataset, Dirichlet split and softmax-regression trainer of the demo.
//! - [`demo`]: `shoal demo`, a real federated training run end to end.
//! - [`cli`]: the `shoal` command line.
//! - [`error`]: the runtime's error type and the typed rejection reasons.

pub mod capacity;
pub mod claims;
pub mod coordinator;
pub mod error;
pub mod exchange;
pub mod gateway;
pub mod hierarchy;
pub mod host;
pub mod infra;
pub mod jobs;
pub mod lease;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod reject;
pub mod shm;
pub mod subjects;

pub use error::{Error, RejectReason, Result};
