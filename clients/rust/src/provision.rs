//! Shoal's JetStream resources, created idempotently (nodes at start-up, the operator):
//! stream `SHOAL_UPDATES` (work-queue retention, duplicate window), object stores
//! `shoal-updates` and `shoal-models`, KV buckets `shoal-jobs` and `shoal-claims` (the default
//! prefix's names: see `shoal_proto::subjects`). Two processes creating them at once both
//! succeed. Their replicas and byte limits come from [`crate::connect::JetStreamOptions`]
//! (`shoal node --js-replicas`, `--updates-max-mib`, `--models-max-mib`,
//! `--transfers-max-mib`); job upload streams take the updates stream's replicas.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use shoal_proto::subjects::{self, Subjects};

use crate::auth::Violations;
use crate::connect::{connect_client, ConnectOptions, Connection};
use crate::error::{Error, Result};

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
        // Without settings (job creation, tools), missing resources get one replica and no byte
        // limit, and existing ones are left as they are; a node passes its settings.
        let reconcile = opts.jetstream.is_some();
        let p = opts.jetstream.clone().unwrap_or_default();
        let updates = ensure_stream(
            &js,
            reconcile,
            stream::Config {
                name: subjects.updates_stream(),
                subjects: vec![subjects.all_updates()],
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: opts.duplicate_window,
                storage: stream::StorageType::File,
                num_replicas: p.replicas,
                max_bytes: p.updates_max_bytes.map_or(-1, clamp_i64),
                ..Default::default()
            },
        )
        .await?;
        let day = Duration::from_secs(24 * 3600);
        let transfers = (p.replicas, p.transfers_max_bytes);
        let update_objects =
            object_bucket(&js, reconcile, &subjects.update_objects_bucket(), day, transfers).await?;
        let models_limits = (p.replicas, p.models_max_bytes);
        let models =
            object_bucket(&js, reconcile, &subjects.models_bucket(), Duration::ZERO, models_limits).await?;
        let jobs = kv_bucket(&js, reconcile, &subjects.jobs_bucket(), 5, Duration::ZERO, p.replicas).await?;
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

    /// Opens the existing resources over `conn`, creating nothing (for tools and tests that
    /// inspect a deployment a node provisioned).
    ///
    /// # Errors
    /// [`Error::Nats`] naming the resource that does not exist or cannot be opened.
    pub async fn open(conn: &Connection) -> Result<Infra> {
        let js = conn.js.clone();
        let s = &conn.subjects;
        let missing = |what: String| {
            move |e: Box<dyn std::error::Error + Send + Sync>| Error::Nats {
                op: "open a provisioned resource",
                source: format!("{what}: {e}").into(),
            }
        };
        let updates =
            js.get_stream(s.updates_stream()).await.map_err(|e| missing(s.updates_stream())(e.into()))?;
        let update_objects = js
            .get_object_store(s.update_objects_bucket())
            .await
            .map_err(|e| missing(s.update_objects_bucket())(e.into()))?;
        let models =
            js.get_object_store(s.models_bucket()).await.map_err(|e| missing(s.models_bucket())(e.into()))?;
        let jobs = js.get_key_value(s.jobs_bucket()).await.map_err(|e| missing(s.jobs_bucket())(e.into()))?;
        Ok(Infra {
            client: conn.client.clone(),
            js,
            updates,
            update_objects,
            models,
            jobs,
            subjects: conn.subjects.clone(),
            violations: conn.violations.clone(),
        })
    }

    /// The connection part of these handles (what [`crate::ShoalClient`] needs).
    pub fn connection(&self) -> Connection {
        Connection {
            client: self.client.clone(),
            js: self.js.clone(),
            subjects: self.subjects.clone(),
            violations: self.violations.clone(),
        }
    }

    /// The server's `max_payload` in bytes.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }
}

/// A stream with `config`, created when missing; with `reconcile`, an existing one whose
/// replicas or byte limit differ from `config`'s is updated to them (so a changed
/// `--js-replicas` or limit takes effect at the next node start). Two processes creating it at
/// once both succeed.
async fn ensure_stream(
    js: &jetstream::Context,
    reconcile: bool,
    config: stream::Config,
) -> Result<stream::Stream> {
    let name = config.name.clone();
    let create_failed = |e: &dyn std::fmt::Display| Error::Nats {
        op: "create a stream",
        source: format!(
            "{name} ({} replica(s)): {e} (is JetStream enabled, `nats-server -js`? More than one replica \
             needs a JetStream cluster of at least that many servers: see --js-replicas)",
            config.num_replicas
        )
        .into(),
    };
    let mut s = match js.get_or_create_stream(config.clone()).await {
        Ok(s) => s,
        Err(e) => js.get_stream(&name).await.map_err(|_| create_failed(&e))?,
    };
    let have = s.info().await.map_err(|e| Error::nats("read stream info", e))?.config.clone();
    if reconcile
        && (have.num_replicas != config.num_replicas || limit(have.max_bytes) != limit(config.max_bytes))
    {
        tracing::info!(
            stream = %name, replicas = config.num_replicas, max_bytes = config.max_bytes,
            was_replicas = have.num_replicas, was_max_bytes = have.max_bytes,
            "updating the stream's replicas and byte limit"
        );
        let update =
            stream::Config { num_replicas: config.num_replicas, max_bytes: config.max_bytes, ..have };
        js.update_stream(update).await.map_err(|e| create_failed(&e))?;
        s = js.get_stream(&name).await.map_err(|e| Error::nats("open stream", e))?;
    }
    Ok(s)
}

/// A byte limit as the server reports it: none (0 or negative in a request) is -1.
fn limit(max_bytes: i64) -> i64 {
    if max_bytes <= 0 {
        -1
    } else {
        max_bytes
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Creates a KV bucket's backing stream directly, with the KV conventions (`KV_<bucket>`,
/// subjects `$KV.<bucket>.>`, per-subject history, rollups, direct gets), then opens the bucket.
/// `create_key_value` is avoided because async-nats 0.51 cannot parse the account-info reply of
/// nats-server 2.9, which it requests first. Entries expire after `max_age` (zero: never).
async fn kv_bucket(
    js: &jetstream::Context,
    reconcile: bool,
    bucket: &str,
    history: i64,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store> {
    ensure_stream(
        js,
        reconcile,
        stream::Config {
            name: subjects::kv_stream(bucket),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: history,
            max_age,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
    )
    .await?;
    js.get_key_value(bucket).await.map_err(|e| Error::nats("open KV bucket", e))
}

/// An object store (stream `OBJ_<name>`) with (`replicas`, byte limit), created when missing;
/// reconciled as [`ensure_stream`] does.
async fn object_bucket(
    js: &jetstream::Context,
    reconcile: bool,
    name: &str,
    max_age: Duration,
    (replicas, max_bytes): (usize, Option<u64>),
) -> Result<object_store::ObjectStore> {
    let max_bytes = max_bytes.map_or(-1, clamp_i64);
    let store = match js.get_object_store(name).await {
        Ok(b) => b,
        Err(_) => {
            let config = object_store::Config {
                bucket: name.into(),
                max_age,
                num_replicas: replicas,
                max_bytes,
                ..Default::default()
            };
            match js.create_object_store(config).await {
                Ok(b) => b,
                Err(e) => js.get_object_store(name).await.map_err(|_| Error::Nats {
                    op: "create an object store",
                    source: format!("{name} ({replicas} replica(s)): {e}").into(),
                })?,
            }
        }
    };
    // An existing bucket takes the configured replicas and limit (its stream is `OBJ_<name>`).
    let stream =
        js.get_stream(subjects::object_stream(name)).await.map_err(|e| Error::nats("open stream", e))?;
    let have = stream.cached_info().config.clone();
    if reconcile && (have.num_replicas != replicas || limit(have.max_bytes) != limit(max_bytes)) {
        ensure_stream(js, true, stream::Config { num_replicas: replicas, max_bytes, ..have }).await?;
    }
    Ok(store)
}

impl Infra {
    /// The KV bucket `shoal-claims` (created on first use; only nodes use it): which update
    /// message a client has for a round, cluster-wide, so a second update cannot slip in through
    /// another node's gateway. Entries expire after `max_age` (the updates stream's duplicate
    /// window).
    ///
    /// # Errors
    /// [`Error::Nats`].
    pub async fn claims(&self, max_age: Duration) -> Result<kv::Store> {
        if let Ok(kv) = self.js.get_key_value(self.subjects.claims_bucket()).await {
            return Ok(kv);
        }
        // As many replicas as the updates stream the node provisioned.
        let replicas = self.updates.cached_info().config.num_replicas;
        kv_bucket(&self.js, false, &self.subjects.claims_bucket(), 1, max_age, replicas).await
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
            chunk_size: Some(crate::jobs::chunk_size(self.max_payload())),
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
