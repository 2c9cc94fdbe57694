//! The `shoal` command line, as a library so that its tests can drive the same code:
//!
//! - [`cli`]: the commands (`node`, `job`, `model`, `client`, `auth`, `demo`, `bench`) and their
//!   flags;
//! - [`jobs`]: `shoal job list|status|cancel|delete` and `shoal model get`;
//! - [`demo`]: `shoal demo`, a real federated training run end to end, with [`sim`], the
//!   digits dataset, its Dirichlet split and the softmax-regression trainer of the simulated
//!   clients;
//! - [`bench`]: `shoal bench`, whole-system benchmarks that print ratios against limits measured
//!   in the same run; [`bench_memory`]: `shoal bench memory`, a node's peak memory against the
//!   model; [`bench_dataplane`], `shoal bench dataplane`: descriptor round trips in process,
//!   over loopback TCP and through SK_MSG redirect; [`bench_ingest`], `shoal bench ingest`: a
//!   node's end-to-end ingest against a raw JetStream consumer of the same bytes;
//!   [`bench_scale`], `shoal bench scale`: clients per round and where the round's time goes;
//!   [`bench_split`]: the gateway + function-host half of `shoal bench dataplane` (cold start,
//!   round latency against the all-in-one node).

#![forbid(unsafe_code)]

pub mod bench;
pub mod bench_dataplane;
pub mod bench_ingest;
pub mod bench_memory;
pub mod bench_scale;
pub mod bench_split;
pub mod cli;
pub mod demo;
pub mod jobs;
pub mod sim;
