//! Connecting to NATS: credentials, TLS, bounded retries with clear errors, and the
//! connection's permission-violation reports ([`Violations`]). A [`Connection`] opens nothing in
//! JetStream: a client with least permissions reads with direct gets and publishes, which need
//! no stream information ([`crate::provision`] creates the resources, for nodes and the
//! operator).

use std::time::Duration;

use async_nats::jetstream;

use crate::auth::{self, NatsAuth, NatsTls, Secret, Violations};
use crate::error::{Error, Result};
use shoal_proto::subjects::{self, Subjects};

/// How long [`connect_client`] keeps retrying an unreachable server.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// Connection options.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// NATS URL(s), comma-separated. Credentials in a URL (`nats://user:pass@host`,
    /// `nats://token@host`) are moved into [`Self::auth`] before connecting, so that they are
    /// never logged.
    pub url: String,
    /// Subject prefix.
    pub prefix: String,
    /// Duplicate window of the updates stream (must exceed the longest round deadline).
    pub duplicate_window: Duration,
    /// Client name shown in the NATS monitoring endpoints.
    pub name: String,
    /// Credentials.
    pub auth: NatsAuth,
    /// TLS.
    pub tls: NatsTls,
    /// Inbox prefix for replies (default `_INBOX`). A client with least permissions must use
    /// [`auth::client_inbox_prefix`], the only inbox it may subscribe to.
    pub inbox_prefix: Option<String>,
    /// Messages a subscription buffers before async-nats drops what arrives next and reports a
    /// slow consumer (`None`: async-nats's default, 65,536).
    pub subscription_capacity: Option<usize>,
    /// Counts the connection's slow-consumer events (a subscription's buffer was full and
    /// messages were dropped); a node passes its `shoal_slow_consumer_events_total`.
    pub slow_consumer_events: Option<prometheus_client::metrics::counter::Counter>,
    /// Counts the connection's losses (a node passes its `shoal_nats_disconnects_total`).
    /// nats-server cuts off a *slow consumer* (more than its `max_pending`, 64 MiB by default,
    /// waiting to be written to the connection) without telling the client why: it shows here,
    /// as a disconnect, and as "Slow Consumer Detected" in the server's log.
    pub disconnects: Option<prometheus_client::metrics::counter::Counter>,
    /// How [`crate::Infra::connect`] provisions streams and buckets. `None` (tools, job
    /// creation): missing ones get one replica and no byte limit, existing ones are left alone;
    /// a node passes its settings, and existing resources are brought to them.
    pub jetstream: Option<JetStreamOptions>,
}

/// Replicas and storage limits of Shoal's JetStream resources (`shoal node --js-replicas`,
/// `--updates-max-mib`, `--models-max-mib`, `--transfers-max-mib`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamOptions {
    /// Replicas of every stream and bucket (1 on a single nats-server; 3 on a JetStream cluster
    /// of three or more servers, to survive the loss of one). Job upload streams take the
    /// updates stream's.
    pub replicas: usize,
    /// Byte limit of the updates stream (`None`: none). When full, publishing an update fails
    /// (the stream discards nothing: it is a work queue).
    pub updates_max_bytes: Option<u64>,
    /// Byte limit of the models bucket (`None`: none). Each job keeps its last few versions.
    pub models_max_bytes: Option<u64>,
    /// Byte limit of the node-to-node transfers bucket (`None`: none).
    pub transfers_max_bytes: Option<u64>,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        JetStreamOptions {
            replicas: 1,
            updates_max_bytes: None,
            models_max_bytes: None,
            transfers_max_bytes: None,
        }
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            url: "nats://127.0.0.1:4222".into(),
            prefix: subjects::DEFAULT_PREFIX.into(),
            duplicate_window: Duration::from_secs(600),
            name: "shoal".into(),
            auth: NatsAuth::default(),
            tls: NatsTls::default(),
            inbox_prefix: None,
            subscription_capacity: None,
            slow_consumer_events: None,
            disconnects: None,
            jetstream: None,
        }
    }
}

impl ConnectOptions {
    /// These options for client `client`: its inbox becomes [`auth::client_inbox_prefix`].
    pub fn for_client(mut self, client: &shoal_proto::ClientId) -> ConnectOptions {
        self.inbox_prefix = Some(auth::client_inbox_prefix(client));
        self
    }

    /// Moves credentials out of the URLs into [`Self::auth`] (unless credentials are set
    /// already, in which case they are only removed from the URLs).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when URLs carry different credentials.
    pub fn without_url_credentials(mut self) -> Result<ConnectOptions> {
        let mut found: Option<(String, Option<String>)> = None;
        let mut urls = Vec::new();
        for url in self.url.split(',').map(str::trim) {
            let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
            let (userinfo, host) = match rest.rsplit_once('@') {
                Some((u, h)) if !u.contains('/') => (Some(u), h),
                _ => (None, rest),
            };
            if let Some(u) = userinfo {
                let creds = match u.split_once(':') {
                    Some((user, pass)) => (user.to_owned(), Some(pass.to_owned())),
                    None => (u.to_owned(), None),
                };
                match &found {
                    Some(f) if *f != creds => {
                        return Err(Error::InvalidOptions("NATS URLs carry different credentials".into()))
                    }
                    _ => found = Some(creds),
                }
            }
            urls.push(if scheme.is_empty() { host.to_owned() } else { format!("{scheme}://{host}") });
        }
        self.url = urls.join(",");
        if let Some((user, pass)) = found {
            if !self.auth.is_set() {
                self.auth = match pass {
                    Some(p) => NatsAuth::user_password(user, p),
                    None => NatsAuth { token: Some(Secret::new(user)), ..NatsAuth::default() },
                };
            }
        }
        Ok(self)
    }
}

/// Connects to NATS with `opts`' credentials and TLS. Unreachable servers are retried for
/// [`CONNECT_DEADLINE`]; refused credentials and TLS failures are returned at once. The
/// returned [`Violations`] receives every permission violation the server reports on this
/// connection (also logged as warnings).
///
/// # Errors
/// [`Error::Unauthorized`] (credentials refused), [`Error::Tls`], [`Error::InvalidOptions`]
/// (also: an invalid prefix), [`Error::Io`] (unreadable creds, seed or certificate files),
/// [`Error::Connect`] when the server stays unreachable.
pub async fn connect_client(opts: &ConnectOptions) -> Result<(async_nats::Client, Violations)> {
    let opts = opts.clone().without_url_credentials()?;
    subjects::validate_prefix(&opts.prefix).map_err(Error::InvalidOptions)?;
    let violations = Violations::default();
    let deadline = tokio::time::Instant::now() + CONNECT_DEADLINE;
    loop {
        let nats = build_options(&opts, &violations).await?;
        let err = match nats.connect(opts.url.as_str()).await {
            Ok(client) => return Ok((client, violations)),
            Err(e) => e,
        };
        use async_nats::ConnectErrorKind as K;
        if let Some(detail) = tls_failure(&err) {
            return Err(Error::Tls { url: opts.url.clone(), detail });
        }
        match err.kind() {
            K::AuthorizationViolation | K::Authentication => {
                return Err(Error::Unauthorized {
                    op: "connect",
                    detail: format!("{err} (check the NATS credentials)"),
                })
            }
            K::ServerParse => return Err(Error::Connect { url: opts.url.clone(), source: err }),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(Error::Connect { url: opts.url.clone(), source: err })
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn build_options(opts: &ConnectOptions, violations: &Violations) -> Result<async_nats::ConnectOptions> {
    let v = violations.clone();
    let counters =
        Counters { slow_consumers: opts.slow_consumer_events.clone(), disconnects: opts.disconnects.clone() };
    let mut nats = async_nats::ConnectOptions::new()
        .name(&opts.name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let (v, counters) = (v.clone(), counters.clone());
            async move { on_event(&v, &counters, event) }
        });
    if let Some(n) = opts.subscription_capacity {
        nats = nats.subscription_capacity(n.max(1));
    }
    if let Some(prefix) = &opts.inbox_prefix {
        nats = nats.custom_inbox_prefix(prefix);
    }
    let nats = opts.tls.apply(nats)?;
    opts.auth.apply(nats).await
}

/// The metrics a connection's events count.
#[derive(Debug, Clone)]
struct Counters {
    slow_consumers: Option<prometheus_client::metrics::counter::Counter>,
    disconnects: Option<prometheus_client::metrics::counter::Counter>,
}

fn on_event(violations: &Violations, counters: &Counters, event: async_nats::Event) {
    use async_nats::{Event, ServerError};
    match event {
        Event::SlowConsumer(sid) => {
            // One event per dropped message: log the 1st, 2nd, 4th, 8th, ... only.
            let n = counters.slow_consumers.as_ref().map(|c| c.inc() + 1).unwrap_or(1);
            if n.is_power_of_two() {
                tracing::warn!(
                    sid,
                    events = n,
                    "slow consumer: a subscription's buffer was full and messages were dropped"
                );
            }
        }
        Event::ServerError(ServerError::Other(msg)) if auth::is_permission_violation(&msg) => {
            tracing::warn!(error = %msg, "NATS refused an operation");
            violations.report(msg);
        }
        Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
        // Reconnect attempts report each failure; the connection state says the rest.
        Event::ClientError(e) => tracing::debug!(error = %e, "NATS client error"),
        Event::Disconnected => {
            let n = counters.disconnects.as_ref().map(|c| c.inc() + 1);
            tracing::warn!(
                disconnects = n,
                "NATS connection lost; reconnecting (if nats-server logged \"Slow Consumer Detected\" for \
                 this connection, it cut it off for falling behind its max_pending)"
            );
        }
        Event::Connected => tracing::debug!("NATS connected"),
        other => tracing::debug!(event = %other, "NATS event"),
    }
}

/// The TLS library's message when a connect error is a TLS failure.
fn tls_failure(err: &async_nats::ConnectError) -> Option<String> {
    if err.kind() == async_nats::ConnectErrorKind::Tls {
        return Some(error_chain(err));
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if e.is::<async_nats::rustls::Error>() {
            return Some(error_chain(err));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<async_nats::rustls::Error>()) {
                return Some(error_chain(err));
            }
        }
        source = e.source();
    }
    None
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

/// A connection to NATS with Shoal's subject names: the core client, a JetStream context, and
/// the permission violations the server reports on it. Cheap to clone.
#[derive(Clone)]
pub struct Connection {
    /// Core client.
    pub client: async_nats::Client,
    /// JetStream context.
    pub js: jetstream::Context,
    /// Subject builder (the options' prefix).
    pub subjects: Subjects,
    /// Permission violations the server reports on this connection.
    pub violations: Violations,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("subjects", &self.subjects).finish()
    }
}

impl Connection {
    /// Connects (see [`connect_client`]); opens no JetStream resource.
    ///
    /// # Errors
    /// As [`connect_client`].
    pub async fn connect(opts: &ConnectOptions) -> Result<Connection> {
        let (client, violations) = connect_client(opts).await?;
        Ok(Connection::new(client, violations, &opts.prefix))
    }

    /// A connection over an existing client.
    pub fn new(client: async_nats::Client, violations: Violations, prefix: &str) -> Connection {
        let js = jetstream::new(client.clone());
        Connection { client, js, subjects: Subjects::new(prefix), violations }
    }

    /// The server's `max_payload` in bytes (headers count against it).
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }
}
