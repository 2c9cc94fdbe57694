//! A private nats-server for the demo, the benchmarks and tests: started on a free loopback
//! port with JetStream on and a private store dir, killed on drop (and with its parent).
//!
//! Typical use: `let server = NatsServer::start()?;` then connect a client to `server.url()`.
//! Use [`NatsServer::start_with`] for a larger `max_payload`, users and permissions
//! ([`NatsOptions::authorization`], e.g. from `shoal_client::auth::authorization_block`), TLS
//! ([`NatsOptions::tls`]) or extra config text.
//!
//! How it works:
//!
//! * The binary is found by [`find_nats_server`]: `$NATS_SERVER_BIN`, else `nats-server` on
//!   `PATH`, else `/usr/sbin/nats-server`. If there is none, starting fails with
//!   [`HarnessError::MissingBinary`], whose message says how to install it. Tests fail; they
//!   never skip.
//! * The server is started with `-a 127.0.0.1 -p -1` (the kernel picks a free port) and
//!   `--ports_file_dir <tempdir>/ports`; nats-server then writes `<exe-name>_<pid>.ports`
//!   containing `{"nats":["nats://127.0.0.1:<port>"]}`, from which the port is read.
//! * JetStream (`-js -sd <tempdir>/js`) and the log file (`-l <tempdir>/nats-server.log`) live in
//!   a private [`tempfile::TempDir`] that is deleted when the [`NatsServer`] is dropped. The
//!   child's stdout/stderr (where nats-server reports configuration errors, before its log file
//!   is open) go to `<tempdir>/nats-server.stderr`; [`NatsServer::log`] returns both.
//! * Ready means: the child is still running, its ports file exists and names a port, and a TCP
//!   connection to that port receives the server's `INFO {...}` greeting. Timeout: 10 s.
//! * The child gets `PR_SET_PDEATHSIG = SIGKILL`, so it dies with the test process even if the
//!   test process is killed without running destructors. Linux sends that signal when the
//!   *thread* that forked the child exits, not the process; so every child is forked by one
//!   long-lived spawner thread private to this module, and servers may be started from any
//!   thread (a scoped thread, `spawn_blocking`, a `static` initialiser) and outlive it.

#![deny(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

/// Environment variable that names the nats-server binary to use.
pub const NATS_SERVER_BIN_ENV: &str = "NATS_SERVER_BIN";

/// Where the binary is looked for when it is neither named by `NATS_SERVER_BIN` nor on `PATH`
/// (Debian's `nats-server` package installs it here).
pub const FALLBACK_NATS_SERVER: &str = "/usr/sbin/nats-server";

/// How long [`NatsServer::start`] and [`NatsServer::restart`] wait for the server to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// nats-server's default `max_pending` (64 MiB). `max_payload` may not exceed `max_pending`.
const DEFAULT_MAX_PENDING: u64 = 64 * 1024 * 1024;

/// Lines of log included in [`HarnessError::Timeout`] and [`HarnessError::Exited`].
const LOG_TAIL_LINES: usize = 40;

/// Errors from starting or restarting a [`NatsServer`].
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// No nats-server binary was found.
    #[error(
        "nats-server binary not found (looked for: {searched}). Install it with \
         `apt-get install nats-server` (Debian/Ubuntu), or download a release from \
         https://github.com/nats-io/nats-server/releases and set {NATS_SERVER_BIN_ENV}=/path/to/nats-server"
    )]
    MissingBinary {
        /// The locations that were tried, for the message.
        searched: String,
    },
    /// The nats-server process could not be spawned.
    #[error("failed to spawn nats-server: {0}")]
    Spawn(#[source] io::Error),
    /// The server did not become ready in time.
    #[error("nats-server was not ready within {timeout:?}; {detail}; log tail:\n{log_tail}")]
    Timeout {
        /// How long we waited.
        timeout: Duration,
        /// Which readiness step had not completed.
        detail: String,
        /// The last lines of the server's log and stderr.
        log_tail: String,
    },
    /// The server process exited before it became ready.
    #[error("nats-server exited before it was ready ({status}); log tail:\n{log_tail}")]
    Exited {
        /// The child's exit status.
        status: ExitStatus,
        /// The last lines of the server's log and stderr.
        log_tail: String,
    },
    /// Any other I/O failure (temp dir, config file, ...).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl HarnessError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| HarnessError::Io { context, source }
    }
}

/// Options for [`NatsServer::start_with`].
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Maximum message payload in bytes (server default: 1 MiB). When set, a config file is
    /// written with `max_payload` and `max_pending = max(max_payload, 64 MiB)`, because
    /// nats-server refuses to start when `max_payload > max_pending`. nats-server 2.9 rejects
    /// values above `i32::MAX` ("max_payload value is too big") and warns above 8 MiB.
    pub max_payload: Option<u64>,
    /// Enable JetStream with a store dir inside the server's temp dir (default: true).
    pub jetstream: bool,
    /// Raw config text appended to the generated config file (accounts, permissions, TLS, ...).
    ///
    /// The command-line flags (`-a`, `-p`, `-js`, `-sd`, `-l`, `--ports_file_dir`) still apply
    /// and take precedence over the file. Do not set `jetstream { store_dir: ... }` here while
    /// `jetstream` is true: nats-server 2.9 then fails with "Duplicate 'store_dir'
    /// configuration". Other `jetstream { ... }` keys (e.g. `max_mem`) merge fine. Keys that
    /// appear twice in the file take the last value, so this text can override `max_pending`.
    pub extra_config: Option<String>,
    /// An `authorization { ... }` block (users and permissions), written into the config file.
    pub authorization: Option<String>,
    /// Serve TLS with these files (the client port then requires TLS).
    pub tls: Option<ServerTls>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions { max_payload: None, jetstream: true, extra_config: None, authorization: None, tls: None }
    }
}

/// The server side of TLS for [`NatsOptions::tls`] (PEM files).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server's certificate (chain). Its subject alternative names must cover the host
    /// clients dial (`127.0.0.1`).
    pub cert_file: PathBuf,
    /// The server certificate's private key.
    pub key_file: PathBuf,
    /// CA that signed client certificates (with `verify_clients`).
    pub ca_file: Option<PathBuf>,
    /// Require and verify client certificates (mutual TLS).
    pub verify_clients: bool,
}

/// Finds the nats-server binary.
///
/// `explicit` is the value of `NATS_SERVER_BIN` (pass `std::env::var_os(NATS_SERVER_BIN_ENV)`;
/// [`NatsServer::start`] does). When it is set it must exist: there is no fallback, so a typo is
/// reported rather than silently ignored. Otherwise `nats-server` on `PATH` is used, else
/// [`FALLBACK_NATS_SERVER`].
pub fn find_nats_server(explicit: Option<&OsStr>) -> Result<PathBuf, HarnessError> {
    if let Some(explicit) = explicit.filter(|p| !p.is_empty()) {
        let path = PathBuf::from(explicit);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(HarnessError::MissingBinary { searched: format!("{NATS_SERVER_BIN_ENV}={}", path.display()) })
        };
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    let fallback = PathBuf::from(FALLBACK_NATS_SERVER);
    if is_executable(&fallback) {
        return Ok(fallback);
    }
    Err(HarnessError::MissingBinary {
        searched: format!("${NATS_SERVER_BIN_ENV} (unset), `nats-server` on PATH, {FALLBACK_NATS_SERVER}"),
    })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// A running nats-server, killed (SIGKILL) and reaped on drop. Its temp dir (JetStream store,
/// config, log) is deleted on drop as well.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    binary: PathBuf,
    /// Arguments other than `-p`.
    args: Vec<OsString>,
    log_path: PathBuf,
    stderr_path: PathBuf,
    ports_dir: PathBuf,
    // Declared last so it is removed after the child is gone.
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server with [`NatsOptions::default`] (JetStream on).
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(NatsOptions::default())
    }

    /// Starts a server with the given options, using the binary from [`find_nats_server`].
    pub fn start_with(opts: NatsOptions) -> Result<Self, HarnessError> {
        let binary = find_nats_server(std::env::var_os(NATS_SERVER_BIN_ENV).as_deref())?;
        Self::start_with_binary(binary, opts)
    }

    /// Starts a server from an explicit binary path (no lookup).
    pub fn start_with_binary(binary: PathBuf, opts: NatsOptions) -> Result<Self, HarnessError> {
        if !is_executable(&binary) {
            return Err(HarnessError::MissingBinary { searched: binary.display().to_string() });
        }
        let dir = tempfile::Builder::new()
            .prefix("shoal-nats-")
            .tempdir()
            .map_err(HarnessError::io("creating nats-server temp dir"))?;
        let root = dir.path();
        let log_path = root.join("nats-server.log");
        let stderr_path = root.join("nats-server.stderr");
        let ports_dir = root.join("ports");
        fs::create_dir(&ports_dir).map_err(HarnessError::io("creating ports dir"))?;

        let mut args: Vec<OsString> = Vec::new();
        if opts.max_payload.is_some()
            || opts.extra_config.is_some()
            || opts.authorization.is_some()
            || opts.tls.is_some()
        {
            let conf = root.join("nats-server.conf");
            fs::write(&conf, config_text(&opts)).map_err(HarnessError::io("writing nats-server config"))?;
            args.push("-c".into());
            args.push(conf.into());
        }
        args.push("-a".into());
        args.push("127.0.0.1".into());
        if opts.jetstream {
            args.push("-js".into());
            args.push("-sd".into());
            args.push(root.join("js").into());
        }
        args.push("-l".into());
        args.push(log_path.clone().into());
        args.push("--ports_file_dir".into());
        args.push(ports_dir.clone().into());

        let mut server =
            NatsServer { child: None, port: 0, binary, args, log_path, stderr_path, ports_dir, dir };
        server.launch(None)?;
        Ok(server)
    }

    /// `nats://127.0.0.1:<port>` (with [`NatsOptions::tls`], clients upgrade to TLS after the
    /// server's greeting, as the server requires it).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `tls://127.0.0.1:<port>`: the same port, for clients that must insist on TLS.
    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    /// The OS process id of the running server, or `None` after [`kill`](Self::kill).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir holding the JetStream store (`js/`), config, log and ports files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file (all runs, including before [`restart`](Self::restart)), followed
    /// by anything the process wrote to stdout/stderr (e.g. config errors), for failure messages.
    pub fn log(&self) -> String {
        read_logs(&self.log_path, &self.stderr_path)
    }

    /// Kills the server with SIGKILL and reaps it. Idempotent; never panics.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it already exited; `wait` still reaps it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server, then starts it again on the same port with the same store dir (and
    /// config), so JetStream streams and their messages survive.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        let port = self.port;
        // The port is normally free again at once (the killed process's sockets are closed when
        // it is reaped, and nats-server binds with SO_REUSEADDR); retry briefly in case not.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.launch(Some(port)) {
                Err(HarnessError::Exited { log_tail, .. })
                    if Instant::now() < deadline && log_tail.contains("address already in use") =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    /// Spawns the child (`-p -1`, or the given port) and waits until it is ready.
    fn launch(&mut self, port: Option<u16>) -> Result<(), HarnessError> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .map_err(HarnessError::io("opening nats-server stderr file"))?;
        let err = out.try_clone().map_err(HarnessError::io("opening nats-server stderr file"))?;

        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args)
            .arg("-p")
            .arg(port.map_or_else(|| "-1".to_string(), |p| p.to_string()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = spawn_tied_to_process(cmd).map_err(HarnessError::Spawn)?;
        let pid = child.id();
        self.child = Some(child);

        match self.wait_ready(pid, port) {
            Ok(port) => {
                self.port = port;
                Ok(())
            }
            Err(e) => {
                self.kill();
                Err(e)
            }
        }
    }

    fn wait_ready(&mut self, pid: u32, expected_port: Option<u16>) -> Result<u16, HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let suffix = format!("_{pid}.ports");
        let mut port: Option<u16> = None;
        let mut last = String::from("ports file not written yet");
        loop {
            let status = match self.child.as_mut() {
                Some(child) => child.try_wait().map_err(HarnessError::io("polling nats-server"))?,
                None => None,
            };
            if let Some(status) = status {
                return Err(HarnessError::Exited { status, log_tail: self.log_tail() });
            }

            if port.is_none() {
                match read_ports_file(&self.ports_dir, &suffix) {
                    Ok(Some(p)) => match expected_port {
                        Some(want) if want != p => {
                            return Err(HarnessError::Io {
                                context: format!("nats-server listens on port {p}, expected {want}"),
                                source: io::Error::other("unexpected port"),
                            })
                        }
                        _ => port = Some(p),
                    },
                    Ok(None) => {}
                    Err(e) => last = format!("ports file: {e}"),
                }
            }
            if let Some(p) = port {
                match probe_info(p) {
                    Ok(()) => return Ok(p),
                    Err(e) => last = format!("port {p} did not greet with INFO: {e}"),
                }
            }

            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    timeout: READY_TIMEOUT,
                    detail: last,
                    log_tail: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        tail_lines(&self.log(), LOG_TAIL_LINES)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `cmd` so that the child is killed (SIGKILL) when this process dies, however it dies:
/// `PR_SET_PDEATHSIG` set in the child, forked from a thread that lives as long as the process.
/// Used for nats-server here and for node processes in the integration tests.
///
/// # Errors
/// The spawn's I/O error.
pub fn spawn_tied_to_process(mut cmd: Command) -> io::Result<Child> {
    let parent = std::process::id();
    // The one unsafe block of this crate (`pre_exec`).
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe operations are allowed. It only calls prctl(2), getppid(2) and
    // builds an io::Error from a raw errno (no allocation); it touches no locks or heap.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If the parent already died between fork and prctl, no signal will come.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    spawn_on_spawner_thread(cmd)
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process, so that `PR_SET_PDEATHSIG`
/// (which fires when the forking *thread* exits) only fires when the whole process dies.
fn spawn_on_spawner_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let started = std::thread::Builder::new().name("nats-server-spawner".into()).spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        });
        if let Err(e) = started {
            // Leave a sender whose receiver is gone; every spawn then reports this below.
            eprintln!("nats harness: cannot start spawner thread: {e}");
        }
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("nats-server spawner thread is not running"))?;
    reply_rx.recv().map_err(|_| io::Error::other("nats-server spawner thread did not answer"))?
}

fn config_text(opts: &NatsOptions) -> String {
    let mut text = String::from("# generated by the shoal nats test harness\n");
    if let Some(max_payload) = opts.max_payload {
        let _ = writeln!(text, "max_payload: {max_payload}");
        let _ = writeln!(text, "max_pending: {}", max_payload.max(DEFAULT_MAX_PENDING));
    }
    if let Some(tls) = &opts.tls {
        let quote = |p: &Path| format!("{:?}", p.display().to_string());
        text.push_str("tls {\n");
        let _ = writeln!(text, "  cert_file: {}", quote(&tls.cert_file));
        let _ = writeln!(text, "  key_file: {}", quote(&tls.key_file));
        if let Some(ca) = &tls.ca_file {
            let _ = writeln!(text, "  ca_file: {}", quote(ca));
        }
        let _ = writeln!(text, "  verify: {}", tls.verify_clients);
        text.push_str("  timeout: 2\n}\n");
    }
    if let Some(auth) = &opts.authorization {
        text.push_str(auth);
        text.push('\n');
    }
    if let Some(extra) = &opts.extra_config {
        text.push_str(extra);
        text.push('\n');
    }
    text
}

/// Reads `<name>_<pid>.ports` (`{"nats":["nats://127.0.0.1:41234"], ...}`) from `dir`.
/// `Ok(None)` while it is absent or still being written.
fn read_ports_file(dir: &Path, suffix: &str) -> io::Result<Option<u16>> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !name.to_string_lossy().ends_with(suffix) {
            continue;
        }
        let text = fs::read_to_string(entry.path())?;
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Ok(None); // partially written; try again
        };
        let url = json
            .get("nats")
            .and_then(|v| v.as_array())
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .ok_or_else(|| io::Error::other(format!("no \"nats\" URL in {text:?}")))?;
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| io::Error::other(format!("cannot parse port from {url:?}")))?;
        return Ok(Some(port));
    }
    Ok(None)
}

/// Connects to the client port and checks that the server greets with `INFO {...}`.
fn probe_info(port: u16) -> io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.starts_with("INFO {") {
        Ok(())
    } else {
        Err(io::Error::other(format!("unexpected greeting {line:?}")))
    }
}

fn read_logs(log_path: &Path, stderr_path: &Path) -> String {
    let mut text = read_lossy(log_path);
    let stderr = read_lossy(stderr_path);
    if !stderr.trim().is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("--- nats-server stdout/stderr ---\n");
        text.push_str(&stderr);
    }
    text
}

fn read_lossy(path: &Path) -> String {
    match File::open(path) {
        Ok(mut f) => {
            let mut bytes = Vec::new();
            let _ = io::Read::read_to_end(&mut f, &mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(_) => String::new(),
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    if lines.is_empty() {
        "(log is empty)".to_string()
    } else {
        lines[start..].join("\n")
    }
}
