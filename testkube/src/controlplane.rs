//! etcd + kube-apiserver on free loopback ports, with a throwaway PKI, ready to use.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::ControlPlaneConfig;
use crate::error::{Error, Result};
use crate::pki::{self, PkiFiles, ADMIN_USER};
use crate::process::Process;
use crate::tools;

/// The context, cluster and kubeconfig-user name the harness writes.
const CONTEXT: &str = "shoal-testkube";

/// How long each part of [`ControlPlane::start`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupTimes {
    /// From spawning etcd to its `/health` answering `true`.
    pub etcd: Duration,
    /// From spawning kube-apiserver to its `/readyz` answering `ok`.
    pub apiserver: Duration,
    /// The whole start: version check, PKI, both processes, client.
    pub total: Duration,
}

/// A running etcd and kube-apiserver (no controller-manager, no scheduler: objects are stored and
/// validated, nothing reconciles them), with an admin client.
///
/// Dropping it kills kube-apiserver, then etcd (SIGKILL, then reaps both), then removes the
/// temp dir holding etcd's data, the PKI, the logs and the kubeconfig.
pub struct ControlPlane {
    // Field order is drop order: the API server goes before its store, the dir last.
    apiserver: Process,
    etcd: Process,
    client: kube::Client,
    kubeconfig: PathBuf,
    server_url: String,
    etcd_version: String,
    startup: StartupTimes,
    dir: TempDir,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server_url", &self.server_url)
            .field("etcd_version", &self.etcd_version)
            .field("process_ids", &self.process_ids())
            .field("work_dir", &self.dir.path())
            .field("startup", &self.startup)
            .finish_non_exhaustive()
    }
}

/// Ports reserved for one control plane.
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
}

impl ControlPlane {
    /// Starts a control plane with [`ControlPlaneConfig::from_env`] (`$SHOAL_TOOLS`).
    ///
    /// # Errors
    /// [`Error::MissingBinary`] when `etcd` or `kube-apiserver` is not in `$SHOAL_TOOLS/bin`,
    /// [`Error::ToolVersion`] for an etcd older than 3.6, [`Error::Exited`] or
    /// [`Error::StartTimeout`] (with the end of the process's log) when a process does not come
    /// up, and the I/O, PKI and client errors of the steps in between.
    pub async fn start() -> Result<Self> {
        Self::start_with(ControlPlaneConfig::from_env()).await
    }

    /// Starts a control plane with an explicit configuration. See [`ControlPlane::start`].
    pub async fn start_with(config: ControlPlaneConfig) -> Result<Self> {
        let begin = Instant::now();
        let etcd_bin = tools::locate("etcd", config.binary("etcd"))?;
        let apiserver_bin = tools::locate("kube-apiserver", config.binary("kube-apiserver"))?;
        let etcd_version = tools::check_etcd(&etcd_bin)?;

        let dir = tempfile::Builder::new().prefix("shoal-testkube-").tempdir().map_err(|source| {
            Error::Io { what: "creating a temp dir", path: std::env::temp_dir(), source }
        })?;
        let pki_dir = make_dir(dir.path(), "pki")?;
        let pki = pki::write(&pki_dir)?;
        let ports = free_ports()?;

        let etcd_started = Instant::now();
        let mut etcd =
            Process::spawn("etcd", &etcd_bin, &etcd_args(dir.path(), &ports), dir.path().join("etcd.log"))?;
        let etcd_port = ports.etcd_client;
        wait_ready(&mut etcd, config.etcd_start_timeout, &config, || etcd_healthy(etcd_port)).await?;
        let etcd_ready = etcd_started.elapsed();

        let server_url = format!("https://127.0.0.1:{}", ports.apiserver);
        let mut args = apiserver_args(&server_url, &pki_dir, &pki, &ports);
        args.extend(config.extra_apiserver_args.iter().cloned());
        let apiserver_started = Instant::now();
        let log = dir.path().join("kube-apiserver.log");
        let mut apiserver = Process::spawn("kube-apiserver", &apiserver_bin, &args, log)?;
        let kubeconfig = write_kubeconfig(dir.path(), &server_url, &pki)?;
        let client = client_from(&kubeconfig).await?;
        let probe = client.clone();
        wait_ready(&mut apiserver, config.apiserver_start_timeout, &config, || readyz(probe.clone())).await?;
        let startup =
            StartupTimes { etcd: etcd_ready, apiserver: apiserver_started.elapsed(), total: begin.elapsed() };
        tracing::info!(?startup, %server_url, "control plane ready");
        Ok(Self { apiserver, etcd, client, kubeconfig, server_url, etcd_version, startup, dir })
    }

    /// A client authenticated as the admin user (group `system:masters`). Cheap to clone; a
    /// client made here is bound to the tokio runtime it was made on (use
    /// [`ControlPlane::new_client`] from another runtime).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A new admin client, built from the kubeconfig on the caller's tokio runtime.
    ///
    /// # Errors
    /// [`Error::Kubeconfig`] or [`Error::Client`] if the kubeconfig cannot be loaded.
    pub async fn new_client(&self) -> Result<kube::Client> {
        client_from(&self.kubeconfig).await
    }

    /// The kubeconfig file (admin user, context `shoal-testkube`, namespace `default`) for CLI
    /// tools such as `helm --kubeconfig` or `kubectl --kubeconfig`. Its certificate paths are
    /// absolute and live as long as the control plane.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The etcd version that passed the start-up check, e.g. `3.6.16`.
    pub fn etcd_version(&self) -> &str {
        &self.etcd_version
    }

    /// How long start-up took.
    pub fn startup(&self) -> StartupTimes {
        self.startup
    }

    /// The temp dir holding etcd's data, the PKI, the logs and the kubeconfig (removed on drop).
    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process ids of etcd and kube-apiserver, in that order.
    pub fn process_ids(&self) -> [u32; 2] {
        [self.etcd.id(), self.apiserver.id()]
    }

    /// etcd's log (stdout and stderr), for a failing test to print.
    pub fn etcd_log(&self) -> &Path {
        self.etcd.log()
    }

    /// kube-apiserver's log (stdout and stderr), for a failing test to print.
    pub fn apiserver_log(&self) -> &Path {
        self.apiserver.log()
    }
}

fn make_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    let path = parent.join(name);
    std::fs::create_dir(&path).map_err(|source| Error::Io {
        what: "creating a directory",
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Three distinct free loopback ports (all bound at once, then released). Another process can
/// take one in between; envtest accepts the same race.
fn free_ports() -> Result<Ports> {
    let bind = || TcpListener::bind(("127.0.0.1", 0)).map_err(Error::Port);
    let (a, b, c) = (bind()?, bind()?, bind()?);
    let port = |l: &TcpListener| l.local_addr().map(|a| a.port()).map_err(Error::Port);
    Ok(Ports { etcd_client: port(&a)?, etcd_peer: port(&b)?, apiserver: port(&c)? })
}

/// A single-member etcd on loopback, data in `<dir>/etcd`, fsync off (the data is thrown away).
fn etcd_args(dir: &Path, ports: &Ports) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", ports.etcd_client);
    let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
    vec![
        "--name=testkube".to_owned(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=testkube={peer}"),
        "--unsafe-no-fsync=true".to_owned(),
    ]
}

/// envtest's default kube-apiserver flags (controller-runtime
/// `pkg/internal/testing/controlplane/apiserver.go` `defaultArgs`, plus its `CertAuthn`'s
/// `--client-ca-file`), with the serving certificate passed explicitly and two additions: the
/// advertise address pinned to loopback, so the server never picks a host address from the
/// default route, and, because 1.37 refuses a loopback advertise address with an endpoint
/// reconciler, `--endpoint-reconciler-type=none` (the `kubernetes` Service gets no Endpoints;
/// nothing runs in-cluster here to use them).
fn apiserver_args(server_url: &str, cert_dir: &Path, pki: &PkiFiles, ports: &Ports) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd_client),
        format!("--cert-dir={}", path(cert_dir)),
        format!("--secure-port={}", ports.apiserver),
        "--bind-address=127.0.0.1".to_owned(),
        "--advertise-address=127.0.0.1".to_owned(),
        "--endpoint-reconciler-type=none".to_owned(),
        "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
        "--allow-privileged=true".to_owned(),
        // No controller-manager runs, so no default ServiceAccount would ever appear.
        "--disable-admission-plugins=ServiceAccount".to_owned(),
        "--authorization-mode=RBAC".to_owned(),
        format!("--service-account-issuer={server_url}/"),
        format!("--service-account-key-file={}", path(&pki.sa_pub)),
        format!("--service-account-signing-key-file={}", path(&pki.sa_key)),
        format!("--client-ca-file={}", path(&pki.client_ca)),
        format!("--tls-cert-file={}", path(&pki.serving_cert)),
        format!("--tls-private-key-file={}", path(&pki.serving_key)),
    ]
}

/// Writes `<dir>/kubeconfig` (JSON, which every kubeconfig reader takes as YAML).
fn write_kubeconfig(dir: &Path, server_url: &str, pki: &PkiFiles) -> Result<PathBuf> {
    let path = |p: &Path| p.display().to_string();
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": CONTEXT,
        "clusters": [{ "name": CONTEXT, "cluster": {
            "server": server_url,
            "certificate-authority": path(&pki.serving_ca),
        }}],
        "users": [{ "name": ADMIN_USER, "user": {
            "client-certificate": path(&pki.admin_cert),
            "client-key": path(&pki.admin_key),
        }}],
        "contexts": [{ "name": CONTEXT, "context": {
            "cluster": CONTEXT, "user": ADMIN_USER, "namespace": "default",
        }}],
    });
    let file = dir.join("kubeconfig");
    std::fs::write(&file, kubeconfig.to_string()).map_err(|source| Error::Io {
        what: "writing the kubeconfig",
        path: file.clone(),
        source,
    })?;
    Ok(file)
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).map_err(Error::Kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(Error::Kubeconfig)?;
    kube::Client::try_from(config).map_err(Error::Client)
}

/// Polls `probe` until it says ready, the process exits, or `timeout` passes.
async fn wait_ready<F, Fut>(
    process: &mut Process,
    timeout: Duration,
    config: &ControlPlaneConfig,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        process.check_running()?;
        if tokio::time::timeout(config.probe_timeout, probe()).await.unwrap_or(false) {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            // A last look: an exit explains more than a timeout.
            process.check_running()?;
            return Err(Error::StartTimeout {
                name: process.name(),
                waited: timeout,
                log_tail: process.log_tail(),
            });
        }
        tokio::time::sleep(config.poll_interval).await;
    }
}

/// etcd's `/health` over plain HTTP/1.0 on loopback: `{"health":"true",...}` once it serves.
async fn etcd_healthy(port: u16) -> bool {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        std::io::Result::Ok(response)
    };
    get.await.is_ok_and(|r| r.starts_with("HTTP/1.") && r.contains(r#""health":"true""#))
}

/// kube-apiserver's `/readyz`: `ok` once every post-start hook (RBAC bootstrap, CRD informers,
/// priority-and-fairness config, ...) has finished.
async fn readyz(client: kube::Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    client.request_text(request).await.is_ok_and(|body| body.trim() == "ok")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ports_are_distinct() {
        let p = free_ports().unwrap();
        assert_ne!(p.etcd_client, p.etcd_peer);
        assert_ne!(p.etcd_client, p.apiserver);
        assert_ne!(p.etcd_peer, p.apiserver);
    }

    #[test]
    fn apiserver_flags_are_loopback_only_and_name_the_pki() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki::write(dir.path()).unwrap();
        let ports = Ports { etcd_client: 1, etcd_peer: 2, apiserver: 3 };
        let args = apiserver_args("https://127.0.0.1:3", dir.path(), &pki, &ports);
        assert!(args.contains(&"--bind-address=127.0.0.1".to_owned()));
        assert!(args.contains(&"--etcd-servers=http://127.0.0.1:1".to_owned()));
        assert!(args.contains(&"--secure-port=3".to_owned()));
        assert!(args.contains(&"--service-account-issuer=https://127.0.0.1:3/".to_owned()));
        for file in [&pki.client_ca, &pki.sa_key, &pki.sa_pub, &pki.serving_cert, &pki.serving_key] {
            assert!(file.is_file(), "{}", file.display());
            assert!(args.iter().any(|a| a.ends_with(&file.display().to_string())), "{}", file.display());
        }
        for arg in etcd_args(dir.path(), &ports) {
            assert!(!arg.contains("://") || arg.contains("://127.0.0.1:"), "{arg}");
        }
    }
}
