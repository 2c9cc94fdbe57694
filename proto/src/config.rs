//! A node's configuration as plain data: the one place its defaults, limits and timings are
//! written. `shoal node` takes its flag defaults from [`NodeConfig::default`], the chart and the
//! operator render the same fields, and [`NodeConfig::validate`] refuses what cannot work.
//!
//! # How the timings depend on each other
//!
//! - **Ack wait** (`ack_wait_ms`, default 30 s): how long JetStream waits for an ack before it
//!   redelivers a held update. Held updates get an in-progress ack every
//!   [`NodeConfig::progress_ack_interval`] = ack wait / 3, so two may be lost before a
//!   redelivery. Failover does not wait for it: a top that takes over an open round, or finds
//!   a node gone, adopts that node's updates from the stream by their claims.
//! - **Leases** ([`Timings::lease_renew_ms`] 1 s, [`Timings::lease_stale_ms`] 3 s): a lease
//!   whose revision an observer has seen unchanged for the stale time may be taken; its holder
//!   acts on it only within two thirds of the stale time after its last acknowledged renewal,
//!   and stops (fences itself) after a longer gap. So stale must exceed two renewals (one lost
//!   renewal must not cost the lease).
//! - **Progress** ([`Timings::progress_heartbeat_ms`] 500 ms, [`Timings::progress_fresh_ms`]
//!   1.5 s): a leaf reports what it holds at least every heartbeat; the top counts a report
//!   for three heartbeats, so a node that died stops counting within 1.5 s.
//! - **Naks** (hand an update back to JetStream for later): the shortest when this node's view
//!   lags the committer by a moment ([`Timings::nak_lagging_ms`]), longer when another node
//!   serves the job ([`Timings::nak_handoff_ms`]) or KV did not answer ([`Timings::nak_retry_ms`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// Why a configuration cannot work; names the field and the accepted range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct ConfigError {
    /// The field (as a flag is named, without dashes: `ack_wait_ms`).
    pub field: &'static str,
    /// What is wrong and what is accepted.
    pub detail: String,
}

/// A node's configuration (`shoal node` flags; the gateway and function host take the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id; names its shared-memory directory and its leases.
    pub node_id: NodeId,
    /// NATS URL(s), comma-separated.
    pub nats_url: String,
    /// Subject prefix.
    pub prefix: String,
    /// Root of the shared-memory directories (a tmpfs); the node uses `<shm_dir>/<node_id>`.
    pub shm_dir: PathBuf,
    /// Shared-memory budget per job, MiB.
    pub shm_budget_mib: u64,
    /// JetStream ack wait for updates held until their round commits, ms.
    pub ack_wait_ms: u64,
    /// Stop an aggregator idle this long, ms.
    pub idle_timeout_ms: u64,
    /// How long a top (or middle) waits for a round's partials before asking again, ms.
    pub collect_timeout_ms: u64,
    /// Updates per JetStream pull request.
    pub pull_batch: u32,
    /// Bytes per JetStream pull request, MiB (at least the server's `max_payload` is asked for,
    /// so that one update always fits). Up to about twice this is in flight to the node at
    /// once; it must stay below nats-server's `max_pending` per connection (64 MiB by
    /// default), past which the server cuts the node off as a slow consumer.
    pub pull_max_mib: u64,
    /// Un-acked updates the shared work-queue consumer allows (JetStream `max_ack_pending`):
    /// updates are acked at their round's commit, so it bounds the updates staged across all
    /// jobs and nodes at once. A job whose rounds need more is refused at creation and at
    /// start.
    pub max_ack_pending: u64,
    /// Replicas of every JetStream stream and bucket Shoal creates (1 on a single nats-server;
    /// 3 on a JetStream cluster of three or more servers). Existing ones are brought to it when
    /// the node starts.
    pub jetstream_replicas: u32,
    /// Byte limit of the updates stream, MiB (`None`: none). When it is full, publishing an
    /// update fails.
    pub updates_max_mib: Option<u64>,
    /// Byte limit of the models bucket, MiB (`None`: none).
    pub models_max_mib: Option<u64>,
    /// Byte limit of the node-to-node transfers bucket, MiB (`None`: none).
    pub transfers_max_mib: Option<u64>,
    /// Most running jobs served at once; `None`: no limit.
    pub max_jobs: Option<u32>,
    /// Fold a round's updates only when it closes (the benchmark's baseline).
    pub lazy_aggregation: bool,
    /// Fault injection: aggregators sleep this long per update they fold, ms (0: off).
    pub fold_delay_ms: u64,
    /// Fold-while-staging: an update on the upload path whose slot is at least this many MiB is
    /// folded piece by piece as its chunks are staged, so it never sits whole in shared memory
    /// next to the accumulator (`None`: off). Only where it is exact and safe: the node's own
    /// function host (not function-host processes), a synchronous streaming strategy, f32
    /// tensors with `mean`/`statistic`/`variance`/`skip` policies.
    pub fold_while_staging_min_mib: Option<u64>,
    /// The protocol's fixed timings.
    pub timings: Timings,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: NodeId::new("node-1").expect("node-1 is a valid node id"),
            nats_url: "nats://127.0.0.1:4222".into(),
            prefix: crate::subjects::DEFAULT_PREFIX.into(),
            shm_dir: PathBuf::from("/dev/shm/shoal"),
            shm_budget_mib: 1024,
            ack_wait_ms: 30_000,
            idle_timeout_ms: 300_000,
            collect_timeout_ms: 10_000,
            pull_batch: 64,
            pull_max_mib: 16,
            max_ack_pending: 1_000_000,
            jetstream_replicas: 1,
            updates_max_mib: None,
            models_max_mib: None,
            transfers_max_mib: None,
            max_jobs: None,
            lazy_aggregation: false,
            fold_delay_ms: 0,
            fold_while_staging_min_mib: Some(16),
            timings: Timings::default(),
        }
    }
}

/// Smallest ack wait accepted: in-progress acks go out every third of it, and JetStream
/// needs a few hundred milliseconds to act on one.
pub const MIN_ACK_WAIT_MS: u64 = 300;
/// Smallest collection timeout accepted.
pub const MIN_COLLECT_TIMEOUT_MS: u64 = 100;
/// Largest pull request accepted, MiB.
pub const MAX_PULL_MIB: u64 = 1024;
/// Longest ack wait, idle timeout or collection timeout accepted: 30 days (the longest round
/// deadline a job may set).
pub const MAX_TIMEOUT_MS: u64 = 30 * 24 * 3600 * 1000;

impl NodeConfig {
    /// Refuses a configuration that cannot work, naming the field and the accepted range.
    ///
    /// # Errors
    /// [`ConfigError`] for a zero, too-small or too-large ack wait, idle timeout, pull batch or
    /// pull size, shared-memory budget, collection timeout, max jobs or replicas, an empty NATS URL or prefix, a prefix that is not one
    /// subject token, or inconsistent timings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, detail: String| Err(ConfigError { field, detail });
        if self.ack_wait_ms < MIN_ACK_WAIT_MS {
            return bad(
                "ack_wait_ms",
                format!("{} ms is below the minimum of {MIN_ACK_WAIT_MS} ms", self.ack_wait_ms),
            );
        }
        if self.ack_wait_ms > MAX_TIMEOUT_MS {
            return bad(
                "ack_wait_ms",
                format!("{} ms is above the maximum of {MAX_TIMEOUT_MS} ms (30 days)", self.ack_wait_ms),
            );
        }
        if self.idle_timeout_ms == 0 || self.idle_timeout_ms > MAX_TIMEOUT_MS {
            return bad(
                "idle_timeout_ms",
                format!("{} ms must be between 1 and {MAX_TIMEOUT_MS} ms (30 days)", self.idle_timeout_ms),
            );
        }
        if self.collect_timeout_ms > MAX_TIMEOUT_MS {
            return bad(
                "collect_timeout_ms",
                format!(
                    "{} ms is above the maximum of {MAX_TIMEOUT_MS} ms (30 days)",
                    self.collect_timeout_ms
                ),
            );
        }
        if self.collect_timeout_ms < MIN_COLLECT_TIMEOUT_MS {
            return bad(
                "collect_timeout_ms",
                format!("{} ms is below the minimum of {MIN_COLLECT_TIMEOUT_MS} ms", self.collect_timeout_ms),
            );
        }
        if self.pull_batch == 0 {
            return bad("pull_batch", "must be at least 1".into());
        }
        if self.max_ack_pending == 0 {
            return bad("max_ack_pending", "must be at least 1".into());
        }
        if self.shm_budget_mib == 0 {
            return bad("shm_budget_mib", "must be at least 1 MiB".into());
        }
        if !(1..=MAX_PULL_MIB).contains(&self.pull_max_mib) {
            return bad(
                "pull_max_mib",
                format!("{} MiB must be between 1 and {MAX_PULL_MIB}", self.pull_max_mib),
            );
        }
        if !(1..=5).contains(&self.jetstream_replicas) {
            return bad(
                "jetstream_replicas",
                format!("{} must be between 1 and 5 (JetStream's range)", self.jetstream_replicas),
            );
        }
        for (field, v) in [
            ("updates_max_mib", self.updates_max_mib),
            ("models_max_mib", self.models_max_mib),
            ("transfers_max_mib", self.transfers_max_mib),
        ] {
            if v == Some(0) {
                return bad(field, "must be at least 1 MiB (omit it for no limit)".into());
            }
        }
        if self.max_jobs == Some(0) {
            return bad("max_jobs", "must be at least 1 (omit it for no limit)".into());
        }
        if self.nats_url.trim().is_empty() {
            return bad("nats_url", "is empty".into());
        }
        if let Err(why) = crate::subjects::validate_prefix(&self.prefix) {
            return bad("prefix", why);
        }
        self.timings.validate()
    }

    /// The ack wait.
    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms)
    }

    /// Interval of in-progress acks for held updates: a third of the ack wait.
    pub fn progress_ack_interval(&self) -> Duration {
        self.ack_wait() / 3
    }

    /// The idle timeout of aggregators.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// The collection timeout.
    pub fn collect_timeout(&self) -> Duration {
        Duration::from_millis(self.collect_timeout_ms)
    }

    /// The shared-memory budget per job, bytes.
    pub fn shm_budget_bytes(&self) -> usize {
        usize::try_from(self.shm_budget_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }

    /// Bytes per pull request for a server whose `max_payload` is `max_payload`: `pull_max_mib`,
    /// and never less than one whole message (the payload and 64 KiB of headers).
    pub fn pull_max_bytes(&self, max_payload: usize) -> usize {
        let mib = usize::try_from(self.pull_max_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        mib.max(max_payload.saturating_add(64 << 10))
    }

    /// A byte limit given in MiB, in bytes.
    pub fn mib_bytes(mib: Option<u64>) -> Option<u64> {
        mib.map(|m| m.saturating_mul(1 << 20))
    }

    /// The fold delay (fault injection).
    pub fn fold_delay(&self) -> Duration {
        Duration::from_millis(self.fold_delay_ms)
    }
}

/// The protocol's fixed timings, in milliseconds (see the module docs for how they depend on
/// each other). Operators rarely change them; tests and the chart may.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timings {
    /// Lease renewal interval.
    pub lease_renew_ms: u64,
    /// A lease not renewed for this long is stale and may be taken.
    pub lease_stale_ms: u64,
    /// A leaf reports its progress at least this often.
    pub progress_heartbeat_ms: u64,
    /// A leaf's progress counts toward the cohort this long after it arrived.
    pub progress_fresh_ms: u64,
    /// How often a node compares its view of the jobs with KV (a KV watch can stall).
    pub state_resync_ms: u64,
    /// How often the gateway checks that its consumer makes progress.
    pub consumer_stall_check_ms: u64,
    /// Pull errors in a row after which the gateway opens its consumer again.
    pub max_pull_errors: u32,
    /// Back-off after a pull error.
    pub pull_error_backoff_ms: u64,
    /// Longest time reading one update object may take.
    pub object_read_timeout_ms: u64,
    /// How long a clean shutdown waits for the node's tasks.
    pub shutdown_grace_ms: u64,
    /// How often the gateway unmaps the shared memory of ended jobs.
    pub prune_interval_ms: u64,
    /// How often a leaf checks whether a commit settled its rounds.
    pub settle_tick_ms: u64,
    /// Retry interval of restarting watches, consumers and lease joins.
    pub retry_ms: u64,
    /// Nak delay when this node's view lags the committer by a moment (the next round).
    pub nak_lagging_ms: u64,
    /// Nak delay when another node serves the job.
    pub nak_handoff_ms: u64,
    /// Nak delay of a whole-cohort update left to the top's node.
    pub nak_pinned_ms: u64,
    /// Nak delay when KV (claims) did not answer, and of updates released at shutdown.
    pub nak_retry_ms: u64,
    /// Nak delay of an asynchronous update that missed its buffer (re-staged for the next).
    pub nak_restage_ms: u64,
    /// How often the gateway publishes the node's demand report for the autoscaler (the
    /// operator ignores a report after three of these).
    pub demand_report_ms: u64,
    /// Time constant of the demand report's arrival-rate EWMA: after this long without
    /// arrivals, e^-1 of the rate is left.
    pub demand_ewma_tau_ms: u64,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            lease_renew_ms: 1000,
            lease_stale_ms: 3000,
            progress_heartbeat_ms: 500,
            progress_fresh_ms: 1500,
            state_resync_ms: 2000,
            consumer_stall_check_ms: 5000,
            max_pull_errors: 5,
            pull_error_backoff_ms: 200,
            object_read_timeout_ms: 60_000,
            shutdown_grace_ms: 10_000,
            prune_interval_ms: 5000,
            settle_tick_ms: 100,
            retry_ms: 1000,
            nak_lagging_ms: 250,
            nak_handoff_ms: 500,
            nak_pinned_ms: 100,
            nak_retry_ms: 1000,
            nak_restage_ms: 50,
            demand_report_ms: 2000,
            demand_ewma_tau_ms: 10_000,
        }
    }
}

/// A timing as a `Duration`.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Timings {
    /// Refuses timings that contradict each other.
    ///
    /// # Errors
    /// [`ConfigError`] when the lease stale time is not above two renewals, progress freshness
    /// not above one heartbeat, or any timing is zero.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, detail: String| Err(ConfigError { field, detail });
        if self.lease_stale_ms <= 2 * self.lease_renew_ms {
            return bad(
                "timings.lease_stale_ms",
                format!(
                    "{} ms must exceed two renewals ({} ms)",
                    self.lease_stale_ms,
                    2 * self.lease_renew_ms
                ),
            );
        }
        if self.progress_fresh_ms <= self.progress_heartbeat_ms {
            return bad(
                "timings.progress_fresh_ms",
                format!(
                    "{} ms must exceed one heartbeat ({} ms)",
                    self.progress_fresh_ms, self.progress_heartbeat_ms
                ),
            );
        }
        let all = [
            ("timings.lease_renew_ms", self.lease_renew_ms),
            ("timings.progress_heartbeat_ms", self.progress_heartbeat_ms),
            ("timings.state_resync_ms", self.state_resync_ms),
            ("timings.consumer_stall_check_ms", self.consumer_stall_check_ms),
            ("timings.object_read_timeout_ms", self.object_read_timeout_ms),
            ("timings.settle_tick_ms", self.settle_tick_ms),
            ("timings.retry_ms", self.retry_ms),
            ("timings.prune_interval_ms", self.prune_interval_ms),
            ("timings.demand_report_ms", self.demand_report_ms),
        ];
        match all.iter().find(|(_, v)| *v == 0) {
            Some((field, _)) => bad(field, "must be positive".into()),
            None => Ok(()),
        }
    }

    /// [`Self::lease_renew_ms`].
    pub fn lease_renew(&self) -> Duration {
        ms(self.lease_renew_ms)
    }

    /// [`Self::lease_stale_ms`].
    pub fn lease_stale(&self) -> Duration {
        ms(self.lease_stale_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_derived_timings_follow_the_ack_wait() {
        let c = NodeConfig::default();
        c.validate().unwrap();
        assert_eq!(c.progress_ack_interval(), Duration::from_secs(10));
        assert_eq!(c.shm_budget_bytes(), 1 << 30);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["ack_wait_ms"], 30_000);
        let back: NodeConfig =
            serde_json::from_value(serde_json::json!({"node_id": "n2", "pull_batch": 8})).unwrap();
        assert_eq!((back.node_id.as_str(), back.pull_batch, back.ack_wait_ms), ("n2", 8, 30_000));
        assert!(
            serde_json::from_value::<NodeConfig>(serde_json::json!({"ack_wait": 1})).is_err(),
            "unknown field"
        );
    }

    #[test]
    fn nonsense_is_refused_naming_the_field() {
        let field = |c: NodeConfig| c.validate().unwrap_err().field;
        assert_eq!(field(NodeConfig { ack_wait_ms: 0, ..Default::default() }), "ack_wait_ms");
        assert_eq!(field(NodeConfig { ack_wait_ms: 299, ..Default::default() }), "ack_wait_ms");
        NodeConfig { ack_wait_ms: 300, ..Default::default() }.validate().unwrap();
        assert_eq!(field(NodeConfig { pull_batch: 0, ..Default::default() }), "pull_batch");
        assert_eq!(field(NodeConfig { max_ack_pending: 0, ..Default::default() }), "max_ack_pending");
        assert_eq!(field(NodeConfig { pull_max_mib: 0, ..Default::default() }), "pull_max_mib");
        assert_eq!(field(NodeConfig { jetstream_replicas: 0, ..Default::default() }), "jetstream_replicas");
        assert_eq!(field(NodeConfig { jetstream_replicas: 7, ..Default::default() }), "jetstream_replicas");
        assert_eq!(field(NodeConfig { models_max_mib: Some(0), ..Default::default() }), "models_max_mib");
        let c = NodeConfig::default();
        assert_eq!(c.pull_max_bytes(1 << 20), 16 << 20);
        assert_eq!(c.pull_max_bytes(64 << 20), (64 << 20) + (64 << 10), "one whole message at least");
        assert_eq!(field(NodeConfig { idle_timeout_ms: 0, ..Default::default() }), "idle_timeout_ms");
        assert_eq!(field(NodeConfig { ack_wait_ms: u64::MAX, ..Default::default() }), "ack_wait_ms");
        assert_eq!(
            field(NodeConfig { collect_timeout_ms: u64::MAX, ..Default::default() }),
            "collect_timeout_ms"
        );
        assert_eq!(field(NodeConfig { shm_budget_mib: 0, ..Default::default() }), "shm_budget_mib");
        assert_eq!(field(NodeConfig { max_jobs: Some(0), ..Default::default() }), "max_jobs");
        assert_eq!(field(NodeConfig { collect_timeout_ms: 99, ..Default::default() }), "collect_timeout_ms");
        assert_eq!(field(NodeConfig { prefix: "a.b".into(), ..Default::default() }), "prefix");
        assert_eq!(field(NodeConfig { prefix: "Other".into(), ..Default::default() }), "prefix");
        let t = Timings { lease_stale_ms: 2000, ..Default::default() };
        assert_eq!(field(NodeConfig { timings: t, ..Default::default() }), "timings.lease_stale_ms");
        let t = Timings { progress_fresh_ms: 500, ..Default::default() };
        assert_eq!(field(NodeConfig { timings: t, ..Default::default() }), "timings.progress_fresh_ms");
    }
}
