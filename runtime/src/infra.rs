//! Connecting to NATS (credentials, TLS, bounded retries with clear errors) and creating
//! Shoal's JetStream resources idempotently at start-up: stream `SHOAL_UPDATES` (work-queue
//! retention, duplicate window), object stores `shoal-updates` and `shoal-models`, KV bucket
//! `shoal-jobs`.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};

use crate::auth::{self, NatsAuth, NatsTls, Secret, Violations};
use crate::error::{Error, Result};
use crate::subjects::{self, Subjects};

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
        }
    }
}

impl ConnectOptions {
    /// These options for client `client`: its inbox becomes [`auth::client_inbox_prefix`].
    pub fn for_client(mut self, client: &shoal_functions::ClientId) -> ConnectOptions {
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
/// [`Error::Unauthorized`] (credentials refused), [`Error::Tls`], [`Error::InvalidOptions`],
/// [`Error::Io`] (unreadable creds, seed or certificate files), [`Error::Connect`] when the
/// server stays unreachable.
pub async fn connect_client(opts: &ConnectOptions) -> Result<(async_nats::Client, Violations)> {
    let opts = opts.clone().without_url_credentials()?;
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
    let slow = opts.slow_consumer_events.clone();
    let mut nats = async_nats::ConnectOptions::new()
        .name(&opts.name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let (v, slow) = (v.clone(), slow.clone());
            async move { on_event(&v, slow.as_ref(), event) }
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

fn on_event(
    violations: &Violations,
    slow_consumers: Option<&prometheus_client::metrics::counter::Counter>,
    event: async_nats::Event,
) {
    use async_nats::{Event, ServerError};
    match event {
        Event::SlowConsumer(sid) => {
            // One event per dropped message: log the 1st, 2nd, 4th, 8th, ... only.
            let n = slow_consumers.map(|c| c.inc() + 1).unwrap_or(1);
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
        Event::Disconnected => tracing::info!("NATS connection lost; reconnecting"),
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

/// Handles to everything Shoal uses in NATS.
#[derive(Clone)]
pub struct Infra {
    /// Core client.
    pub client: async_nats::Client,
    /// JetStream context.
    pub js: jetstream::Context,
    /// The updates stream.
    pub updates: stream::Stream,
    /// Large updates.
    pub update_objects: object_store::ObjectStore,
    /// Committed models.
    pub models: object_store::ObjectStore,
    /// Job specs and states.
    pub jobs: kv::Store,
    /// Subject builder.
    pub subjects: Subjects,
    /// Permission violations the server reports on this connection.
    pub violations: Violations,
}

impl std::fmt::Debug for Infra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Infra").field("subjects", &self.subjects).finish()
    }
}

impl Infra {
    /// Connects (see [`connect_client`]) and ensures every resource exists, creating what is
    /// missing. With least-privilege credentials the resources must exist already (a node
    /// creates them); a creation the credentials forbid fails as [`Error::Unauthorized`].
    ///
    /// # Errors
    /// As [`connect_client`]; [`Error::Nats`] when JetStream is disabled or a resource cannot
    /// be created.
    pub async fn connect(opts: &ConnectOptions) -> Result<Infra> {
        let (client, violations) = connect_client(opts).await?;
        let guard = violations.clone();
        guard
            .guard("open the JetStream resources (does a node run?)", async move {
                let mut infra = Self::with_client(client, opts).await?;
                infra.violations = violations;
                Ok(infra)
            })
            .await
    }

    /// Like [`Self::connect`] with an existing client.
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub async fn with_client(client: async_nats::Client, opts: &ConnectOptions) -> Result<Infra> {
        let js = jetstream::new(client.clone());
        let subjects = Subjects::new(opts.prefix.clone());
        let updates = js
            .get_or_create_stream(stream::Config {
                name: subjects::UPDATES_STREAM.into(),
                subjects: vec![subjects.all_updates()],
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: opts.duplicate_window,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                Error::nats(
                    "create stream SHOAL_UPDATES (is JetStream enabled? start nats-server with -js)",
                    e,
                )
            })?;
        let update_objects =
            object_bucket(&js, subjects::UPDATES_BUCKET, Duration::from_secs(24 * 3600)).await?;
        let models = object_bucket(&js, subjects::MODELS_BUCKET, Duration::ZERO).await?;
        let jobs = kv_bucket(&js, subjects::JOBS_BUCKET, 5).await?;
        Ok(Infra {
            client,
            js,
            updates,
            update_objects,
            models,
            jobs,
            subjects,
            violations: Violations::default(),
        })
    }

    /// The server's `max_payload` in bytes.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }
}

/// Creates a KV bucket's backing stream directly, with the KV conventions (`KV_<bucket>`,
/// subjects `$KV.<bucket>.>`, per-subject history, rollups, direct gets), then opens the bucket.
/// `create_key_value` is avoided because async-nats 0.51 cannot parse the account-info reply of
/// nats-server 2.9, which it requests first.
async fn kv_bucket(js: &jetstream::Context, bucket: &str, history: i64) -> Result<kv::Store> {
    kv_bucket_aged(js, bucket, history, Duration::ZERO).await
}

/// [`kv_bucket`] whose entries expire after `max_age` (zero: never).
async fn kv_bucket_aged(
    js: &jetstream::Context,
    bucket: &str,
    history: i64,
    max_age: Duration,
) -> Result<kv::Store> {
    if let Ok(kv) = js.get_key_value(bucket).await {
        return Ok(kv);
    }
    js.get_or_create_stream(stream::Config {
        name: subjects::kv_stream(bucket),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
        max_age,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        storage: stream::StorageType::File,
        num_replicas: 1,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| Error::nats("create KV stream", e))?;
    js.get_key_value(bucket).await.map_err(|e| Error::nats("open KV bucket", e))
}

async fn object_bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Result<object_store::ObjectStore> {
    if let Ok(b) = js.get_object_store(name).await {
        return Ok(b);
    }
    match js
        .create_object_store(object_store::Config { bucket: name.into(), max_age, ..Default::default() })
        .await
    {
        Ok(b) => Ok(b),
        Err(e) => js.get_object_store(name).await.map_err(|_| Error::nats("create object store", e)),
    }
}

/// Internal transfers between nodes (partials, shard exchanges) too large for one message go
/// through `shoal-updates` under a `_`-prefixed name.
impl Infra {
    /// The KV bucket `shoal-claims` (created on first use; only nodes use it): which update
    /// message a client has for a round, cluster-wide, so a second update cannot slip in through
    /// another node's gateway. Entries expire after `max_age` (the updates stream's duplicate
    /// window).
    ///
    /// # Errors
    /// [`Error::Nats`].
    pub async fn claims(&self, max_age: Duration) -> Result<kv::Store> {
        kv_bucket_aged(&self.js, subjects::CLAIMS_BUCKET, 1, max_age).await
    }

    /// Subscribes to `subject`; `what` names it in the error.
    ///
    /// # Errors
    /// [`Error::Nats`].
    pub async fn subscribe(&self, subject: String, what: &'static str) -> Result<async_nats::Subscriber> {
        self.client.subscribe(subject).await.map_err(|e| Error::nats(what, e))
    }

    /// Stores `bytes` as object `name` in `shoal-updates`.
    ///
    /// # Errors
    /// [`Error::Nats`].
    pub async fn put_transfer(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let meta = object_store::ObjectMetadata {
            name: name.to_owned(),
            chunk_size: Some(crate::jobs::chunk_size(self)),
            ..Default::default()
        };
        self.update_objects
            .put(meta, &mut &bytes[..])
            .await
            .map_err(|e| Error::nats("store a transfer", e))?;
        Ok(())
    }

    /// Reads object `name` from `shoal-updates` and deletes it.
    ///
    /// # Errors
    /// [`Error::Nats`] (e.g. a missing object), [`Error::Io`].
    pub async fn take_transfer(&self, name: &str) -> Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut obj = self.update_objects.get(name).await.map_err(|e| Error::nats("fetch a transfer", e))?;
        let mut buf = Vec::with_capacity(obj.info().size);
        obj.read_to_end(&mut buf).await.map_err(|e| Error::io("read a transfer", e))?;
        if let Err(e) = self.update_objects.delete(name).await {
            tracing::debug!(object = %name, error = %e, "deleting a consumed transfer failed");
        }
        Ok(buf)
    }
}
