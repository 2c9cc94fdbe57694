//! The Rust SDK of Shoal.
//!
//! - [`client`]: [`ShoalClient`], what an FL client uses: read the job's state, fetch the global
//!   model, publish an update (inline or through the object store, chosen by size), wait for
//!   the round's outcome, fetch a personal reward. Everything fits a client's least NATS
//!   permissions.
//! - [`connect`]: [`ConnectOptions`] and [`Connection`]: credentials, TLS, bounded retries,
//!   permission-violation reports.
//! - [`provision`]: [`Infra`], Shoal's streams and buckets created idempotently (nodes and the
//!   operator call it; [`ShoalClient::connect`] never does).
//! - [`jobs`]: the job store: create a job, read its spec and state, compare-and-set the state,
//!   store and read models.
//! - [`objects`]: object-store reads and writes that need no consumer (models).
//! - [`uploads`]: the upload path of large client updates (chunks in the job's own stream).
//! - [`auth`]: credentials and TLS settings, and the nats-server `authorization` block generator
//!   (`shoal auth nats-config`).
//! - [`error`]: the SDK's [`Error`] and its `Copy` [`ErrorKind`].
//!
//! The wire contract itself (ids, specs, messages, subjects) is `shoal_proto`.

#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod connect;
pub mod error;
pub mod jobs;
pub mod objects;
pub mod provision;
pub mod uploads;

pub use client::{ShoalClient, Transport, UpdateRequest};
pub use connect::{ConnectOptions, Connection};
pub use error::{Error, ErrorKind, Result};
pub use provision::Infra;
