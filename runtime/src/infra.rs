//! Connecting to NATS and creating Shoal's JetStream resources idempotently at start-up: stream
//! `SHOAL_UPDATES` (work-queue retention, duplicate window), object stores `shoal-updates` and
//! `shoal-models`, KV bucket `shoal-jobs`.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};

use crate::error::{Error, Result};
use crate::subjects::{self, Subjects};

/// Connection options.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// NATS URL(s), comma-separated.
    pub url: String,
    /// Subject prefix.
    pub prefix: String,
    /// Duplicate window of the updates stream (must exceed the longest round deadline).
    pub duplicate_window: Duration,
    /// Client name shown in the NATS monitoring endpoints.
    pub name: String,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            url: "nats://127.0.0.1:4222".into(),
            prefix: subjects::DEFAULT_PREFIX.into(),
            duplicate_window: Duration::from_secs(600),
            name: "shoal".into(),
        }
    }
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
}

impl std::fmt::Debug for Infra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Infra").field("subjects", &self.subjects).finish()
    }
}

impl Infra {
    /// Connects and ensures every resource exists (creating what is missing).
    ///
    /// # Errors
    /// [`Error::Connect`] when NATS is unreachable; [`Error::Nats`] when JetStream is disabled or
    /// a resource cannot be created.
    pub async fn connect(opts: &ConnectOptions) -> Result<Infra> {
        let client = async_nats::ConnectOptions::new()
            .name(&opts.name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(opts.url.as_str())
            .await
            .map_err(|source| Error::Connect { url: opts.url.clone(), source })?;
        // retry_on_initial_connect returns at once; wait (bounded) for the first connection.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Timeout(Duration::from_secs(10), "the first NATS connection"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self::with_client(client, opts).await
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
        Ok(Infra { client, js, updates, update_objects, models, jobs, subjects })
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
    if let Ok(kv) = js.get_key_value(bucket).await {
        return Ok(kv);
    }
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
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
