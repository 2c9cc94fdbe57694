//! Shoal's Kubernetes operator core: the sans-IO autoscaler, locality-aware placement,
//! hierarchy planning and the what-if simulator behind `shoal-operator simulate`.
//!
//! Everything here is pure: no API server, no NATS, no clock. The reconcile loop (a later
//! layer) feeds [`autoscaler::Autoscaler::tick`] what the gateways report and applies the
//! [`autoscaler::Decision`] as one function-host Deployment per (job, node); the simulator feeds it
//! a recorded or generated arrival trace instead.
//!
//! Modules:
//! - [`policy`]: the `autoscaling` and `placement` blocks of a `FederatedJob` (reference
//!   R2.1/R1.4 field names and defaults), serde + JSON Schema for the CRD, `validate()`.
//! - [`autoscaler`]: the per-job state machine of R2.2 (KPA stable/panic windows, backlog term,
//!   HPA tolerance, behavior rate limits and stabilization, activation from and scale to zero).
//! - [`placement`]: per-node demand → hosts per node (best-fit decreasing, round-robin,
//!   first-fit, worst-fit) under the per-node cap and the locality constraint.
//! - [`plan`]: the aggregation hierarchy of one round (leaves, middles, top) placed where the
//!   partial bytes are (R1.3).
//! - [`trace`]: arrival traces (`time_s,node,job,updates,bytes`): parser, writer, generator.
//! - [`simulate`]: replays a trace through the autoscaler and placement with a simple host
//!   model and summarises cost, cold starts, queueing delay and locality per strategy.
//! - [`report`]: the simulator's report directory (CSV, PNG plots, summary table).
//! - [`duration`], [`node`], [`error`]: `60s`-style durations, node names, this crate's errors.

#![forbid(unsafe_code)]

pub mod autoscaler;
pub mod config;
pub mod controller;
pub mod crd;
pub mod demand;
pub mod duration;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod plan;
pub mod policy;
pub mod render;
pub mod report;
pub mod server;
pub mod simulate;
pub mod status;
pub mod trace;

pub use autoscaler::{Autoscaler, Decision, EventReason, LimitReason, Mode, NodeObservation, Observation};
pub use duration::KubeDuration;
pub use error::{Error, ErrorKind, Result};
pub use node::NodeName;
pub use policy::{AutoscalingPolicy, PlacementPolicy, PlacementStrategy, ScalingSpec};
