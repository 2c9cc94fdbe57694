//! Shoal's JetStream resources, created idempotently (nodes at start-up, the operator):
//! stream `SHOAL_UPDATES` (work-queue retention, duplicate window), object stores
//! `shoal-updates` and `shoal-models`, KV buckets `shoal-jobs` and `shoal-claims`. Two
//! processes creating them at once both succeed.

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
        let updates = ensure_stream(
            &js,
            stream::Config {
                name: subjects::UPDATES_STREAM.into(),
                subjects: vec![subjects.all_updates()],
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: opts.duplicate_window,
                storage: stream::StorageType::File,
                ..Default::default()
            },
            "create stream SHOAL_UPDATES (is JetStream enabled? start nats-server with -js)",
        )
        .await?;
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

    /// Opens the existing resources over `conn`, creating nothing (for tools and tests that
    /// inspect a deployment a node provisioned).
    ///
    /// # Errors
    /// [`Error::Nats`] naming the resource that does not exist or cannot be opened.
    pub async fn open(conn: &Connection) -> Result<Infra> {
        let js = conn.js.clone();
        let updates = js
            .get_stream(subjects::UPDATES_STREAM)
            .await
            .map_err(|e| Error::nats("open stream SHOAL_UPDATES", e))?;
        let update_objects = js
            .get_object_store(subjects::UPDATES_BUCKET)
            .await
            .map_err(|e| Error::nats("open shoal-updates", e))?;
        let models = js
            .get_object_store(subjects::MODELS_BUCKET)
            .await
            .map_err(|e| Error::nats("open shoal-models", e))?;
        let jobs =
            js.get_key_value(subjects::JOBS_BUCKET).await.map_err(|e| Error::nats("open shoal-jobs", e))?;
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
    ensure_stream(
        js,
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
            num_replicas: 1,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
        "create KV stream",
    )
    .await?;
    js.get_key_value(bucket).await.map_err(|e| Error::nats("open KV bucket", e))
}

/// Opens stream `config.name`, creating it when missing. Idempotent under a race: when several
/// processes start at once and another one created the stream between our lookup and our create
/// (JetStream refuses a second create whose config differs in any default), the stream it
/// created is opened instead of failing the start-up.
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
    what: &'static str,
) -> Result<stream::Stream> {
    let name = config.name.clone();
    match js.get_or_create_stream(config).await {
        Ok(s) => Ok(s),
        Err(e) => match js.get_stream(&name).await {
            Ok(s) => Ok(s),
            Err(_) => Err(Error::nats(what, e)),
        },
    }
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
