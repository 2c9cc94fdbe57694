//! Test harness for Shoal's integration tests: a real `nats-server` (from
//! `shoal_natsd`), `shoal node` processes started from the built binary and killed
//! on drop, and helpers to build jobs, random updates and the independent f64 oracle; a
//! throwaway PKI ([`TestPki`], generated with rcgen) for TLS tests.

#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use shoal_client::connect::ConnectOptions;
use shoal_functions::tensor::encode_safetensors;
use shoal_functions::{JobId, JobSpec, ModelManifest, RoundPolicy, StrategySpec, UpdateKind};
pub use shoal_natsd::{NatsOptions, NatsServer, ServerTls};
use shoal_proto::RejectNotice;

/// A manifest of `(name, dtype, shape)` tensors with the default (`mean`) policy.
///
/// # Panics
/// If the manifest is invalid (a fixture bug).
pub fn manifest(tensors: &[(&str, shoal_proto::DType, &[usize])]) -> Arc<ModelManifest> {
    let specs = tensors.iter().map(|(n, d, s)| shoal_proto::TensorSpec::new(*n, *d, s.to_vec())).collect();
    Arc::new(ModelManifest::new(specs).expect("fixture manifest"))
}

/// A client without credentials (tests connect as the admin of their private server).
///
/// # Panics
/// If the server cannot be reached.
pub async fn connect(url: &str) -> shoal_client::ShoalClient {
    shoal_client::ShoalClient::connect(&ConnectOptions { url: url.into(), ..Default::default() })
        .await
        .expect("connect to the test nats-server")
}

/// Path of the built `shoal` binary (next to the test executable's `deps/` directory).
///
/// # Panics
/// If the binary is missing, with instructions.
pub fn shoal_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("shoal");
    assert!(
        bin.exists(),
        "{} not found: run `cargo test --workspace` (which builds it) or `cargo build -p shoal-cli` first",
        bin.display()
    );
    bin
}

/// A `shoal node` child process, SIGKILLed on drop (and when the test process dies).
#[derive(Debug)]
pub struct NodeProcess {
    child: Option<Child>,
    /// Node id.
    pub node_id: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// How readiness probes connect (credentials, TLS); `None`: plainly to the URL.
    probe: Option<ConnectOptions>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    /// Starts `shoal node` against `nats_url` with a private shm root and `extra` flags, and
    /// waits until it answers its metrics subject.
    pub async fn start(nats_url: &str, node_id: &str, extra: &[&str]) -> NodeProcess {
        Self::start_with(nats_url, node_id, extra, &[], None).await
    }

    /// Like [`Self::start`] with `shoal gateway` instead of `shoal node` (function hosts in
    /// processes of their own).
    pub async fn start_gateway(nats_url: &str, node_id: &str, extra: &[&str]) -> NodeProcess {
        let mut n = Self::spawned_as("gateway", nats_url, node_id, extra, &[], None);
        n.wait_ready(nats_url).await;
        n
    }

    /// Like [`Self::launch`] with `shoal gateway` instead of `shoal node`.
    pub fn launch_gateway(nats_url: &str, node_id: &str, extra: &[&str]) -> NodeProcess {
        Self::spawned_as("gateway", nats_url, node_id, extra, &[], None)
    }

    /// Like [`Self::start`], with environment variables for the process (`SHOAL_NATS_PASSWORD`
    /// and friends) and `probe`: how the readiness probe connects to a server that wants
    /// credentials or TLS.
    pub async fn start_with(
        nats_url: &str,
        node_id: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
        probe: Option<ConnectOptions>,
    ) -> NodeProcess {
        let mut n = Self::spawned(nats_url, node_id, extra, envs, probe);
        n.wait_ready(nats_url).await;
        n
    }

    /// Starts `shoal node` like [`Self::start`] but returns at once, without waiting for it to
    /// answer (for tests of what it does before it is ready); [`Self::wait_ready`] waits.
    pub fn launch(nats_url: &str, node_id: &str, extra: &[&str]) -> NodeProcess {
        Self::spawned(nats_url, node_id, extra, &[], None)
    }

    fn spawned(
        nats_url: &str,
        node_id: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
        probe: Option<ConnectOptions>,
    ) -> NodeProcess {
        Self::spawned_as("node", nats_url, node_id, extra, envs, probe)
    }

    fn spawned_as(
        command: &str,
        nats_url: &str,
        node_id: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
        probe: Option<ConnectOptions>,
    ) -> NodeProcess {
        let dir = tempfile::Builder::new().prefix("shoal-test-").tempdir_in(shm_base()).expect("shm tempdir");
        let mut args = vec![
            command.to_string(),
            "--nats-url".into(),
            nats_url.into(),
            "--node-id".into(),
            node_id.into(),
            "--shm-dir".into(),
            dir.path().display().to_string(),
        ];
        // A free loopback port unless the test chose one: several nodes share this machine.
        if !extra.contains(&"--http") {
            args.extend(["--http".to_string(), "127.0.0.1:0".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = dir.path().join("node.log");
        let envs = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut n = NodeProcess { child: None, node_id: node_id.into(), args, envs, probe, log, _dir: dir };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("node log");
        let err = out.try_clone().expect("node log");
        let mut cmd = Command::new(shoal_bin());
        cmd.args(&self.args)
            .env("RUST_LOG", std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        self.child = Some(shoal_natsd::spawn_tied_to_process(cmd).expect("spawn shoal node"));
    }

    /// Waits until the node answers its metrics subject (20 s at most).
    ///
    /// # Panics
    /// If the node exits or does not answer in time, with its log.
    pub async fn wait_ready(&mut self, nats_url: &str) {
        let client = match &self.probe {
            Some(opts) => shoal_client::connect::connect_client(opts).await.expect("probe connect").0,
            None => async_nats::connect(nats_url).await.expect("connect"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let subject = self.metrics_subject();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("node exited early ({status}); log:\n{}", self.log());
            }
            if let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_millis(500),
                client.request(subject.clone(), Bytes::new()),
            )
            .await
            {
                return;
            }
            assert!(Instant::now() < deadline, "node not ready after 20 s; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `<prefix>.node.<id>.metrics`, with the node's `--prefix` (default `shoal`).
    fn metrics_subject(&self) -> String {
        let prefix = self
            .args
            .iter()
            .position(|a| a == "--prefix")
            .and_then(|i| self.args.get(i + 1))
            .map_or(shoal_proto::subjects::DEFAULT_PREFIX, String::as_str);
        format!("{prefix}.node.{}.metrics", self.node_id)
    }

    /// SIGKILLs the process (no shutdown path runs) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs the process (the clean shutdown path) and waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("node running");
        // SAFETY: kill(2) with a pid this process spawned and a valid signal number; it touches
        // no memory of ours.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM)
        };
        c.wait().expect("wait for node")
    }

    /// SIGSTOPs the process: it stays alive, holds its sockets and memory, and does nothing
    /// (a long GC pause, a frozen VM) until [`Self::resume`].
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONTs a paused process.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.pid().expect("node running");
        // SAFETY: kill(2) with a pid this process spawned and a valid signal number; it touches
        // no memory of ours.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Starts the same node again (same id, flags and shm root).
    pub async fn restart(&mut self, nats_url: &str) {
        if self.child.is_some() {
            self.kill();
        }
        self.spawn();
        self.wait_ready(nats_url).await;
    }

    /// Waits up to `within` for the process to exit on its own; its exit status, or `None` if it
    /// is still running (or was never started).
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if status.is_some() {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, or `None` while the node is not running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process's resident memory (`VmRSS` of `/proc/<pid>/status`, which includes the
    /// shared-memory segments it maps), in bytes; `None` while not running.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid()?)
    }

    /// The node's shared-memory directory (`<shm root>/<node id>`).
    pub fn shm_dir(&self) -> PathBuf {
        self._dir.path().join(&self.node_id)
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address of the node's HTTP listener (`/metrics`, `/healthz`, `/readyz`), from the
    /// line the node logs when it binds it; `None` until then (or with `--http off`). After a
    /// restart, the latest.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        http_addr_in_log(&self.log())
    }

    /// The node's Prometheus metrics text.
    pub async fn metrics(&self, client: &async_nats::Client) -> String {
        let m = client.request(self.metrics_subject(), Bytes::new()).await.expect("metrics request");
        String::from_utf8_lossy(&m.payload).into_owned()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `shoal function-host` child process started beside a gateway (as the operator would start
/// one with `--function-hosts external`, no `--gateway`: it asks the node over NATS), SIGKILLed
/// on drop (and when the test process dies).
#[derive(Debug)]
pub struct FunctionHostProcess {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl FunctionHostProcess {
    /// Starts function host `function` for `gateway`'s node, mapping its segments, with `--http
    /// <http>` (`off`, or `127.0.0.1:0` for a free port it logs).
    ///
    /// # Panics
    /// If the process cannot be spawned.
    pub fn start(nats_url: &str, gateway: &NodeProcess, function: u32, http: &str) -> FunctionHostProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("host.log");
        let out = std::fs::File::create(&log).expect("host log");
        let shm_root = gateway.shm_dir().parent().expect("the gateway's shm root").to_owned();
        let mut cmd = Command::new(shoal_bin());
        cmd.args(["function-host", "--nats-url", nats_url, "--node-id", &gateway.node_id])
            .arg("--shm-dir")
            .arg(&shm_root)
            .args(["--function-id", &function.to_string(), "--http", http])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("host log"))
            .stderr(out);
        let child = shoal_natsd::spawn_tied_to_process(cmd).expect("spawn shoal function-host");
        FunctionHostProcess { child, log, _dir: dir }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The HTTP address it logged (started with `--http 127.0.0.1:0`), waiting up to 20 s.
    ///
    /// # Panics
    /// If it logs none in time, with its log.
    pub async fn http_addr(&self) -> std::net::SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(a) = http_addr_in_log(&self.log()) {
                return a;
            }
            assert!(Instant::now() < deadline, "the function host logged no HTTP listener:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for FunctionHostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in the last "HTTP listening" line of a Shoal process's log.
pub fn http_addr_in_log(log: &str) -> Option<std::net::SocketAddr> {
    log.lines()
        .rev()
        .filter(|l| l.contains("HTTP listening"))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")?.parse().ok()))
}

/// One plain HTTP/1.1 `GET` of `path` (no keep-alive): the status code and the body.
///
/// # Errors
/// Connecting, writing or reading failed, or the answer is not HTTP.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or_else(bad)?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body).ok_or_else(bad)?
    } else {
        body.to_owned()
    };
    Ok((code, body))
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        body = rest.get(n..)?.strip_prefix("\r\n")?;
    }
}

/// `VmRSS` of process `pid` in bytes (from `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn shm_base() -> PathBuf {
    let p = PathBuf::from("/dev/shm");
    if p.is_dir() {
        p
    } else {
        std::env::temp_dir()
    }
}

/// A sync-round FedAvg job spec.
pub fn job_spec(
    job: &str,
    manifest: ModelManifest,
    cohort: u32,
    min: u32,
    deadline_ms: u64,
    rounds: u64,
) -> JobSpec {
    JobSpec {
        job: JobId::new(job).expect("job id"),
        manifest,
        strategy: StrategySpec::Fedavg { server_learning_rate: 1.0 },
        round_policy: RoundPolicy::Sync { cohort_size: cohort, min_clients: min, deadline_ms },
        update_kind: UpdateKind::Parameters,
        rounds,
        max_num_examples: 1_000_000_000,
        max_failed_rounds: 5,
        fan_in: 0,
        server_optimizer: None,
        max_update_bytes: None,
        max_clients_per_round: None,
        inline_limit_bytes: None,
        chunk_bytes: None,
        upload_quota_bytes: None,
    }
}

/// Random tensor values for `manifest` (uniform in [-2, 2], integers in [-1000, 1000]).
pub fn random_values(manifest: &ModelManifest, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    manifest
        .tensors()
        .iter()
        .map(|t| {
            (0..t.numel())
                .map(|_| {
                    if t.dtype.is_float() {
                        rng.gen_range(-2.0..2.0)
                    } else {
                        rng.gen_range(-1000..=1000) as f64
                    }
                })
                .collect()
        })
        .collect()
}

/// The values a client actually sends after rounding to the manifest's dtypes.
pub fn as_sent(manifest: &Arc<ModelManifest>, values: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let p =
        shoal_functions::Parameters::from_f64(Arc::clone(manifest), values).expect("values fit the manifest");
    (0..values.len()).map(|i| p.tensor_f64(i)).collect()
}

/// Encodes values as a safetensors payload.
pub fn payload(manifest: &Arc<ModelManifest>, values: &[Vec<f64>]) -> Bytes {
    Bytes::from(encode_safetensors(manifest, values).expect("encode"))
}

/// Publishes client `client-<c>`'s update for the open round `state` of `job`: values drawn by
/// [`random_values`] from `seed` and rounded as sent, weight `n`, on the upload path when
/// `upload`. Returns what the f64 oracle needs (the values as sent, the weight).
///
/// # Panics
/// If the publish fails (test input).
pub async fn send_update(
    client: &shoal_client::ShoalClient,
    m: &Arc<ModelManifest>,
    job: &JobId,
    state: &shoal_proto::JobState,
    (c, seed, n): (u64, u64, u64),
    upload: bool,
) -> (Vec<Vec<f64>>, f64) {
    let values = as_sent(m, &random_values(m, seed));
    client
        .publish_update(shoal_client::UpdateRequest {
            job: job.clone(),
            client: shoal_functions::ClientId::new(format!("client-{c}")).expect("client id"),
            round: state.round,
            base_version: state.model_version,
            num_examples: n,
            kind: UpdateKind::Parameters,
            payload: payload(m, &values),
            force_upload: upload,
        })
        .await
        .expect("publish");
    (values, n as f64)
}

/// The independent f64 oracle: Σ w_i x_i / Σ w_i per element, computed here from the values
/// as sent, without any Shoal code.
pub fn weighted_mean_oracle(updates: &[(Vec<Vec<f64>>, f64)]) -> Vec<Vec<f64>> {
    let total: f64 = updates.iter().map(|(_, w)| w).sum();
    let mut out: Vec<Vec<f64>> = updates[0].0.iter().map(|t| vec![0.0; t.len()]).collect();
    for (vals, w) in updates {
        for (o, v) in out.iter_mut().zip(vals) {
            for (a, b) in o.iter_mut().zip(v) {
                *a += w * b;
            }
        }
    }
    for o in &mut out {
        for a in o.iter_mut() {
            *a /= total;
        }
    }
    out
}

/// Subscribes to every rejection notice of `job`.
pub async fn rejections(client: &async_nats::Client, job: &str) -> async_nats::Subscriber {
    let s = client.subscribe(format!("shoal.{job}.rejected.*")).await.expect("subscribe");
    client.flush().await.expect("flush");
    s
}

/// Waits for the next rejection notice.
pub async fn next_rejection(sub: &mut async_nats::Subscriber) -> RejectNotice {
    let m = tokio::time::timeout(Duration::from_secs(15), sub.next())
        .await
        .expect("no rejection notice within 15 s")
        .expect("subscription ended");
    shoal_proto::decode("reject notice", &m.payload).expect("decode notice")
}

/// Initialises test logging once (RUST_LOG controls it).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}

/// A nats-server and one `shoal node` shared by every test of a test binary (each test uses its
/// own job). Both processes die with the test process (`PR_SET_PDEATHSIG`).
#[derive(Debug)]
pub struct SharedCluster {
    /// The server.
    pub nats: NatsServer,
    /// The node.
    pub node: NodeProcess,
}

impl SharedCluster {
    /// Starts the cluster once per process with `node_args`; later calls return the same one.
    pub fn get(
        cell: &'static std::sync::OnceLock<SharedCluster>,
        node_args: &'static [&'static str],
    ) -> &'static SharedCluster {
        cell.get_or_init(|| {
            // Started on a private thread and runtime: the caller is inside its own test runtime.
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async {
                    let nats = NatsServer::start().expect("nats-server");
                    let node = NodeProcess::start(&nats.url(), "shared", node_args).await;
                    SharedCluster { nats, node }
                })
            })
            .join()
            .expect("cluster start")
        })
    }
}

/// A throwaway PKI for TLS tests, generated with rcgen at test time: a CA, a server certificate
/// for `127.0.0.1` and `localhost`, a client certificate (all signed by the CA), and an
/// unrelated second CA. PEM files in a temp dir, deleted on drop.
#[derive(Debug)]
pub struct TestPki {
    /// The CA certificate.
    pub ca_cert: PathBuf,
    /// The server certificate.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A CA that signed nothing here (a client trusting only it must fail).
    pub other_ca_cert: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestPki {
    /// Generates the certificates and writes them.
    ///
    /// # Panics
    /// If generation or writing fails.
    pub fn generate() -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new().prefix("shoal-pki-").tempdir().expect("pki dir");
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write pem");
            path
        };
        let ca = |name: &str| {
            let key = KeyPair::generate().expect("ca key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).expect("ca cert");
            (cert.pem(), Issuer::new(params, key))
        };
        let (ca_pem, issuer) = ca("shoal test CA");
        let (other_pem, _) = ca("unrelated test CA");
        let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(sans).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, &issuer).expect("leaf cert");
            (cert.pem(), key.serialize_pem())
        };
        let (server_pem, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "shoal test nats-server",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_pem, client_key) =
            leaf(vec!["shoal-node".into()], "shoal test client", ExtendedKeyUsagePurpose::ClientAuth);
        TestPki {
            ca_cert: write("ca.pem", ca_pem),
            server_cert: write("server.pem", server_pem),
            server_key: write("server-key.pem", server_key),
            client_cert: write("client.pem", client_pem),
            client_key: write("client-key.pem", client_key),
            other_ca_cert: write("other-ca.pem", other_pem),
            _dir: dir,
        }
    }
}

/// Publishes client `who`'s update for `state`'s open round, trained on its model version:
/// random values from `seed` (as sent, after rounding to the manifest's dtypes) with weight
/// `n`. Returns what was sent, for the oracle.
///
/// # Panics
/// If the id is invalid or the publish fails.
pub async fn send_random(
    c: &shoal_client::ShoalClient,
    m: &Arc<ModelManifest>,
    job: &JobId,
    who: &str,
    state: &shoal_proto::JobState,
    seed: u64,
    n: u64,
) -> (Vec<Vec<f64>>, f64) {
    let values = as_sent(m, &random_values(m, seed));
    c.publish_update(shoal_client::UpdateRequest {
        job: job.clone(),
        client: shoal_functions::ClientId::new(who).expect("client id"),
        round: state.round,
        base_version: state.model_version,
        num_examples: n,
        kind: UpdateKind::Parameters,
        payload: payload(m, &values),
        force_upload: false,
    })
    .await
    .expect("publish");
    (values, n as f64)
}

/// The provisioned resources, opened over `client`'s connection (tests connect without
/// permissions, so they may inspect streams and buckets and create jobs).
///
/// # Panics
/// If no node has provisioned them.
pub async fn infra_of(client: &shoal_client::ShoalClient) -> shoal_client::Infra {
    shoal_client::Infra::open(client.connection()).await.expect("open the provisioned resources")
}

/// Asserts that the updates stream empties within `within`: every update was acked (acks follow
/// the commit, so the work queue empties shortly after the state says committed).
///
/// # Panics
/// With the number of messages left when `within` passes.
pub async fn assert_stream_drains(client: &shoal_client::ShoalClient, within: Duration) {
    let mut stream = infra_of(client).await.updates;
    let deadline = Instant::now() + within;
    loop {
        let left = stream.info().await.expect("stream info").state.messages;
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{left} updates never acked after the commit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `f` until it succeeds (NATS may be restarting, a node may be paused), for at most
/// 90 s; panics with the last error after that.
pub async fn retry<T, Fut>(what: &str, mut f: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = shoal_client::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < deadline, "{what}: still failing after 90 s: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The job state written by the commit of `round` (from the KV key's history, so that a reader
/// that was slow, or cut off by a NATS restart, still finds it).
pub async fn state_after(
    client: &shoal_client::ShoalClient,
    job: &str,
    round: u64,
) -> Option<shoal_proto::JobState> {
    let mut history = infra_of(client).await.jobs.history(format!("{job}.state")).await.ok()?;
    let mut found = None;
    while let Some(Ok(e)) = history.next().await {
        let Ok(s) = shoal_proto::decode::<shoal_proto::JobState>("job state", &e.value) else { continue };
        if s.last_commit.as_ref().is_some_and(|c| c.round == shoal_functions::RoundId(round)) {
            found = Some(s);
        }
    }
    found
}

/// The clients a commit folded when client `c` sends with weight 2^c: the bits of
/// `total_weight`. Panics (with `context`) when `total_weight` is no such set below 2^`clients`,
/// or when the commit's update count `count` is not its popcount (a second 2^c carries into
/// another bit: an update folded twice).
pub fn folded_by_weight(
    total_weight: f64,
    count: u32,
    clients: u32,
    context: &str,
) -> std::collections::BTreeSet<u32> {
    let bits = total_weight as u64;
    assert!(
        bits as f64 == total_weight && bits > 0 && bits < 1 << clients,
        "{context}: total weight {total_weight} is no set of clients"
    );
    assert_eq!(
        count,
        bits.count_ones(),
        "{context}: {count} updates for total weight {total_weight}: one was folded twice"
    );
    (0..clients).filter(|c| bits & (1 << c) != 0).collect()
}

/// Asserts every element of `model` is within 1e-6 relative (absolute below 1e-3) of `oracle`,
/// naming `context` in the failure.
pub fn assert_model_near(model: &shoal_functions::Parameters, oracle: &[Vec<f64>], context: &str) {
    for (i, want) in oracle.iter().enumerate() {
        for (e, (g, o)) in model.tensor_f64(i).iter().zip(want).enumerate() {
            assert!(
                (g - o).abs() <= 1e-6 * o.abs().max(1e-3),
                "{context} tensor {i}[{e}]: committed {g}, oracle {o}"
            );
        }
    }
}

/// Why this machine cannot run a node's eBPF sidecar (`--ebpf required`), or `None` when it can:
/// root or CAP_BPF + CAP_NET_ADMIN in the effective set, and a cgroup2 mount. The tests that
/// need it skip with this reason, or fail when `SHOAL_EBPF_REQUIRED=1` (`.ci/run` sets it where
/// the machine allows loading).
pub fn ebpf_unavailable() -> Option<String> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| caps & (1 << cap) != 0;
    if !(has(CAP_BPF) && has(CAP_NET_ADMIN)) {
        return Some(format!("no CAP_BPF + CAP_NET_ADMIN (CapEff {caps:#x})"));
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("cgroup2")) {
        return Some("no cgroup v2 mounted".into());
    }
    None
}

/// `true` if the eBPF tests may run here; otherwise prints `<test>: skipped: <reason>` and
/// returns `false`.
///
/// # Panics
/// When the machine cannot load and `SHOAL_EBPF_REQUIRED=1` insists.
pub fn ebpf_allowed(test: &str) -> bool {
    let Some(reason) = ebpf_unavailable() else { return true };
    assert!(
        std::env::var("SHOAL_EBPF_REQUIRED").as_deref() != Ok("1"),
        "{test}: SHOAL_EBPF_REQUIRED=1 but {reason}"
    );
    println!("{test}: skipped: {reason}");
    false
}
