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
//!   model.
//!   in the same run; [`bench_dataplane`], `shoal bench dataplane`: descriptor round trips in
//!   process, over loopback TCP and through SK_MSG redirect.

#![forbid(unsafe_code)]

pub mod bench;
pub mod bench_dataplane;
pub mod bench_memory;
pub mod bench_split;
pub mod cli;
pub mod demo;
pub mod jobs;
pub mod sim;
