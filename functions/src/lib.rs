//! Shoal's aggregation maths: strategies and numeric kernels, pure and synchronous.
//!
//! This crate has no I/O, no async runtime, no NATS and no Kubernetes: it can be unit-tested,
//! property-tested, fuzzed, benchmarked and called from any runtime. The node runtime
//! (`shoal-runtime`) feeds it views of client updates staged in shared memory.
//!
//! Modules:
//! - [`tensor`]: [`Parameters`] (a model's tensors in the canonical slot
//!   layout of `shoal_proto::manifest`), typed views of tensor bytes, safetensors encoding, and
//!   ingest validation of safetensors payloads ([`tensor::stage_update`]).
//! - [`kernels`]: the fold kernels (`acc += w * x`, decoded from f32/f16/bf16/f64/integers into an
//!   f64 accumulator), the cohort scans of RFFL and Bristle and Krum's Gram sub-tile, each with a
//!   plain reference kernel beside the optimised one, and a memory-read baseline for benchmarks.
//!   It holds all of the crate's `unsafe` (AVX2 twins chosen at run time, in its private `x86`
//!   module); everything else is `#![deny(unsafe_code)]`.
//! - [`strategy`]: the [`Strategy`] trait (streaming-mergeable and whole-cohort strategies),
//!   [`PartialAggregate`] and [`UpdateView`].
//! - [`fedavg`]: FedAvg (McMahan et al., AISTATS 2017), weighted by `num_examples`, folded eagerly.
//! - [`asynchronous`]: FedBuff (Nguyen et al., AISTATS 2022), FedFix and asynchronous FedAvg
//!   (Fraboni et al., JMLR 2023) as server steps over stale deltas, with staleness weights.
//! - [`server_opt`]: FedAvgM, FedAdam, FedYogi, FedAdagrad (Reddi et al., ICLR 2021) applied
//!   after any strategy.
//! - [`robust`]: coordinate-wise median and trimmed mean (Yin et al., ICML 2018), Krum and
//!   Multi-Krum (Blanchard et al., NeurIPS 2017), Bulyan (El Mhamdi et al., ICML 2018).
//! - [`rffl`]: RFFL reputation, removal and per-client rewards (Xu & Lyu, FL-ICML 2021), on one
//!   node or across nodes ([`rffl::twophase`]: per-client scalars and partial sums cross nodes,
//!   never updates).
//! - [`bristle`]: Bristle's distance prioritizer and per-class integrator (arXiv 2110.11006), on
//!   one node or across nodes ([`bristle::twophase`]).
//! - [`state`]: the versioned, size-bounded encoding of a strategy's state (reputations,
//!   optimizer moments, ...) that the top persists with each commit, and its typed errors.
//! - [`statistics`]: running statistics (BatchNorm): the arithmetic of the `statistic` and
//!   `variance` policies, and the job-create warnings for statistics a server step could
//!   invalidate.
//! - [`factory`]: builds a job's strategy from its `shoal_proto::JobSpec`, and validates a spec
//!   completely.
//! - [`error`]: this crate's error type and its `Copy` kind.

#![deny(unsafe_code)]

pub mod asynchronous;
pub mod bristle;
pub mod error;
pub mod factory;
pub mod fedavg;
pub mod kernels;
pub mod rffl;
pub mod robust;
pub mod server_opt;
pub mod shard;
pub mod state;
pub mod statistics;
pub mod strategy;
pub mod tensor;

pub use error::{Error, ErrorKind, Result};
pub use fedavg::FedAvg;
/// The contract's ids and spec, re-exported where this crate's API uses them.
pub use shoal_proto::{ids, spec};
pub use shoal_proto::{ClientId, JobId, ModelVersion, NodeId, RoundId};
pub use shoal_proto::{JobSpec, RoundPolicy, RoundRule, StrategySpec, UpdateKind};
pub use strategy::{Mergeability, PartialAggregate, Sharding, Strategy, TwoPhase, UpdateView};
pub use tensor::{AggregationPolicy, DType, ModelManifest, Parameters, TensorSpec, ValidationError};
