//! Where the tool binaries are and how long each start-up step may take: the one place for the
//! harness's timings.

use std::path::PathBuf;
use std::time::Duration;

/// Environment variable naming the directory `tools/build-go-tools.sh` installs into; the
/// binaries are in its `bin/`.
pub const TOOLS_ENV: &str = "SHOAL_TOOLS";

/// `$SHOAL_TOOLS` when it is unset.
pub const DEFAULT_TOOLS_DIR: &str = "/var/tmp/shoal-tools";

/// How to start a [`crate::ControlPlane`].
///
/// The timeouts are ceilings, not expectations: on an idle 2-core machine etcd is healthy in well
/// under a second and kube-apiserver ready in a few seconds, but a cold page cache (a 100 MB
/// binary) and other builds on the same cores stretch that several-fold. Every wait polls at
/// [`poll_interval`](Self::poll_interval), so a longer ceiling costs nothing when all is well.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// Directory whose `bin/` holds `etcd` and `kube-apiserver` (from `$SHOAL_TOOLS`, default
    /// [`DEFAULT_TOOLS_DIR`]).
    pub tools_dir: PathBuf,
    /// How long etcd may take to answer `/health` with `"health":"true"`.
    pub etcd_start_timeout: Duration,
    /// How long kube-apiserver may take, after etcd is healthy, to answer `/readyz` with `ok`.
    pub apiserver_start_timeout: Duration,
    /// Pause between two readiness probes; also the per-probe deadline is
    /// [`probe_timeout`](Self::probe_timeout).
    pub poll_interval: Duration,
    /// Deadline of one readiness probe (a hung connection must not eat the whole start timeout).
    pub probe_timeout: Duration,
    /// Flags appended to kube-apiserver's (envtest's defaults plus the PKI). A later flag wins.
    pub extra_apiserver_args: Vec<String>,
}

impl ControlPlaneConfig {
    /// The defaults, with the tools directory from `$SHOAL_TOOLS`.
    pub fn from_env() -> Self {
        let tools_dir = std::env::var_os(TOOLS_ENV)
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_TOOLS_DIR), PathBuf::from);
        Self { tools_dir, ..Self::default() }
    }

    /// Where the binary `name` is expected: `<tools_dir>/bin/<name>`.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.tools_dir.join("bin").join(name)
    }
}

impl Default for ControlPlaneConfig {
    /// [`DEFAULT_TOOLS_DIR`] (not the environment: see [`ControlPlaneConfig::from_env`]), etcd 30 s,
    /// kube-apiserver 90 s, polls every 100 ms with a 5 s probe deadline.
    fn default() -> Self {
        Self {
            tools_dir: PathBuf::from(DEFAULT_TOOLS_DIR),
            etcd_start_timeout: Duration::from_secs(30),
            apiserver_start_timeout: Duration::from_secs(90),
            poll_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_secs(5),
            extra_apiserver_args: Vec::new(),
        }
    }
}
