//! The operator's own configuration: what it renders into function-host pods (image, NATS URL,
//! the credentials Secret) and every timing of the reconcile loop, named in one place with how
//! they depend on each other.

use std::time::Duration;

use crate::crd::FunctionHostTemplate;

/// Where function hosts mount the node's shared memory, read-only (the gateway owns it).
pub const SHM_DIR: &str = "/dev/shm/shoal";
/// The function host's HTTP port (`/metrics`, `/healthz`, `/readyz`), named `http`.
pub const HOST_HTTP_PORT: i32 = 9465;
/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "shoal-operator";
/// Keys of the credentials Secret rendered into function hosts as environment variables (each
/// optional; the `shoal` command reads them).
pub const NATS_SECRET_KEYS: [&str; 3] = ["SHOAL_NATS_USER", "SHOAL_NATS_PASSWORD", "SHOAL_NATS_TOKEN"];

/// The operator's configuration (flags and environment of `shoal-operator run`).
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorConfig {
    /// Default function-host image (`spec.podTemplate.image` overrides it).
    pub image: String,
    /// The NATS URL rendered into function hosts (and used by the operator itself).
    pub nats_url: String,
    /// NATS subject prefix.
    pub prefix: String,
    /// Secret holding `SHOAL_NATS_USER`/`SHOAL_NATS_PASSWORD`/`SHOAL_NATS_TOKEN` for function
    /// hosts; none: hosts connect without credentials.
    pub nats_credentials_secret: Option<String>,
    /// The defaults of every function-host pod, under each job's `spec.podTemplate`
    /// (`--function-host-template`; the chart's `functionHost.template`).
    pub host_defaults: FunctionHostTemplate,
    /// A node's demand report older than this is ignored (gateways report every tick; three
    /// missed reports at the default 2 s tick).
    pub demand_stale_after: Duration,
    /// Time after a round's deadline before `RoundProgressing=False reason=DeadlineExceeded`:
    /// the top still collects partials and commits after the deadline itself.
    pub round_deadline_grace: Duration,
    /// Requeue of a job whose phase is final (Finished, Failed) or that is suspended.
    pub idle_requeue: Duration,
    /// Requeue after a reconcile error (`error_policy`).
    pub error_requeue: Duration,
    /// How many times cleanup retries the compare-and-set that cancels a job before it
    /// reports an error (and the finalizer stays for the next attempt).
    pub cancel_attempts: u32,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            image: "ghcr.io/shoal/shoal:latest".into(),
            nats_url: "nats://nats:4222".into(),
            prefix: shoal_proto::subjects::DEFAULT_PREFIX.into(),
            nats_credentials_secret: None,
            host_defaults: FunctionHostTemplate::default(),
            demand_stale_after: Duration::from_secs(6),
            round_deadline_grace: Duration::from_secs(30),
            idle_requeue: Duration::from_secs(300),
            error_requeue: Duration::from_secs(5),
            cancel_attempts: 5,
        }
    }
}
