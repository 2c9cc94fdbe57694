//! Test support for Shoal's Kubernetes tier: a real etcd and kube-apiserver started on free
//! loopback ports with a throwaway PKI, and a server-side-apply applier for multi-document YAML.
//!
//! The binaries come from `$SHOAL_TOOLS/bin` (default `/var/tmp/shoal-tools/bin`), where
//! `tools/build-go-tools.sh` builds them from the Go module proxy. A missing binary is an error
//! that names that script, never a skipped test. No controller-manager or scheduler runs, so tests
//! assert the objects stored, not what controllers would make of them.
//!
//! - [`controlplane`]: [`ControlPlane`] starts etcd (refusing anything older than 3.6) and
//!   kube-apiserver with envtest's default flags, waits for `/readyz`, hands out an admin
//!   `kube::Client` and a kubeconfig for CLI tools, and kills both on drop.
//! - [`config`]: [`ControlPlaneConfig`], where the binaries are and every start-up timing.
//! - [`apply`]: [`apply_stream`] parses a YAML stream (e.g. `helm template` output) and applies it
//!   with server-side apply: CRDs first, waited on until established, then Namespaces, then the
//!   rest; it reports each accepted object and refuses with a typed error.
//! - [`error`]: [`Error`] and its `Copy` [`ErrorKind`].
//! - `pki`, `process`, `tools` (private): certificates and keys (rcgen), child processes with
//!   their logs, binary lookup and the etcd version gate.
//!
//! ```no_run
//! # async fn demo() -> shoal_testkube::Result<()> {
//! let plane = shoal_testkube::ControlPlane::start().await?;
//! let applied = shoal_testkube::apply_stream(
//!     &plane.client(),
//!     "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: demo}\ndata: {a: b}\n",
//!     &shoal_testkube::ApplyOptions::new("shoal-operator"),
//! )
//! .await?;
//! assert_eq!(applied[0].name, "demo");
//! # Ok(()) }
//! ```
//!
//! k8s-openapi: this crate enables no Kubernetes version feature in its normal dependency (the
//! final crate picks one; k8s-openapi refuses two). Its own tests pick `v1_37`, the version of the
//! API server they start.

pub mod apply;
pub mod config;
pub mod controlplane;
pub mod error;
mod pki;
mod process;
mod tools;

pub use apply::{apply_objects, apply_stream, parse_stream, wait_established, ApplyOptions, ObjectId};
pub use config::{ControlPlaneConfig, DEFAULT_TOOLS_DIR, TOOLS_ENV};
pub use controlplane::{ControlPlane, StartupTimes};
pub use error::{Error, ErrorKind, Result};
pub use pki::{ADMIN_GROUP, ADMIN_USER};
pub use tools::{etcd_version_ok, parse_etcd_version, MIN_ETCD};
