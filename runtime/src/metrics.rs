//! Node metrics (Prometheus text format), served on request at `<prefix>.node.<node>.metrics`.
//! Labels are bounded (`&'static str` reasons, outcomes and tiers, and job ids: a node serves a
//! bounded set of jobs); nothing is recorded per element or inside a fold. The chart's Grafana
//! dashboard queries these names (`charts/shoal/files/dashboards/shoal.json`, checked by
//! `tests/tests/dashboard.rs` against a running node).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::RejectReason;

/// The counter type of the node's metrics (for [`crate::nats::ConnectOptions::slow_consumer_events`]).
pub use prometheus_client::metrics::counter::Counter;

/// Label set with one `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Bounded reason.
    pub reason: &'static str,
}

/// Label set of a job's rounds: the job id (bounded by the jobs a node serves) and the outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobOutcomeLabel {
    /// The job id.
    pub job: String,
    /// Bounded outcome (`committed`, `quorum_not_met`, `aggregation_failed`).
    pub outcome: &'static str,
}

/// Label set with one `job`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    /// The job id.
    pub job: String,
}

/// A histogram family whose histograms all have the same buckets.
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets of the round latency, in seconds: 0.5 ms to about 16 s, doubling.
fn round_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Buckets of an update's staleness, in model versions: 0 (synchronous rounds) to 64.
pub const STALENESS_BUCKETS: [f64; 9] = [0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Label set with one aggregation `tier` (`leaf`, `middle`, `top`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    /// Bounded tier name.
    pub tier: &'static str,
}

/// Label set of the eBPF sidecar's per-function descriptor counters: the function host
/// ([`shoal_proto::FunctionId`] as a number, or `unregistered` for messages of a channel before
/// its handshake ended; bounded by the hosts of a node) and the `direction` (`to_host`:
/// descriptors; `to_gateway`: releases and settles).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionDirectionLabel {
    /// The function id, or `unregistered`.
    pub function: String,
    /// `to_host` or `to_gateway`.
    pub direction: &'static str,
}

/// Label set of the gateway's own tally of descriptor-channel frames: the function host (its
/// [`shoal_proto::FunctionId`] as a number; bounded by the hosts of a node), the `direction`
/// (`to_host`, `to_gateway`) and the frame type
/// ([`crate::host::channel::frame_name`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionFrameLabel {
    /// The function id.
    pub function: String,
    /// `to_host` or `to_gateway`.
    pub direction: &'static str,
    /// The frame type.
    pub frame: &'static str,
}

/// Label set with one fencing `event`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// Bounded event name (see [`Metrics::FENCING_EVENTS`]).
    pub event: &'static str,
}

/// All node metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Updates written into shared memory.
    pub updates_staged: Counter,
    /// Bytes written into shared memory.
    pub bytes_staged: Counter,
    /// Updates refused, by reason.
    pub updates_rejected: Family<ReasonLabel, Counter>,
    /// Rounds ended, by job and outcome (counted by the node that committed or failed them).
    pub rounds: Family<JobOutcomeLabel, Counter>,
    /// Aggregators started from nothing.
    pub cold_starts: Counter,
    /// Aggregators reused for a new round.
    pub warm_reuses: Counter,
    /// Aggregators alive on this node, by tier: leaf actors, middle roles, jobs this node is
    /// the top of.
    pub aggregators: Family<TierLabel, Gauge>,
    /// Seconds from the last accepted update of a round to its commit, by job (observed by the
    /// top).
    pub round_latency: HistogramFamily<JobLabel>,
    /// Staleness (current model version minus the update's base version) of every staged
    /// update; 0 in synchronous rounds.
    pub update_staleness: Histogram,
    /// Seconds from an update reaching the function host to a newly started aggregator
    /// handling it (cold start).
    pub cold_start_seconds: Histogram,
    /// As `cold_start_seconds`, for an idle aggregator reused for a new round (warm).
    pub warm_reuse_seconds: Histogram,
    /// Update messages delivered again after their round's model already included them (their
    /// node died before acking, or nats-server lost the ack): acked, not folded again.
    pub updates_already_applied: Counter,
    /// Slow-consumer events of the node's NATS connection (a subscription's buffer was full and
    /// async-nats dropped messages; JetStream redelivers un-acked updates).
    pub slow_consumer_events: Counter,
    /// Losses of the node's NATS connection. nats-server cuts off a slow consumer (more than
    /// its `max_pending` waiting to be written to the connection) without telling the client:
    /// such server-side slow-consumer events count here (and in the server's log).
    pub nats_disconnects: Counter,
    /// Bytes of partial aggregates sent to other nodes.
    pub partial_bytes_sent: Counter,
    /// Bytes of partial aggregates received from other nodes.
    pub partial_bytes_received: Counter,
    /// Times the gateway opened its pull consumer again (it ended, failed or stalled).
    pub consumer_restarts: Counter,
    /// Bytes of update slices and shard results sent in coordinate-sharded exchanges.
    pub shard_bytes_sent: Counter,
    /// Bytes of update slices and shard results received in coordinate-sharded exchanges.
    pub shard_bytes_received: Counter,
    /// Bytes this node sent to other nodes in two-phase exchanges (RFFL, Bristle): requests
    /// (counted once per node asked) and answers.
    pub twophase_bytes_sent: Counter,
    /// Bytes this node received from other nodes in two-phase exchanges.
    pub twophase_bytes_received: Counter,
    /// Updates this node read from its own shared memory in two-phase exchanges (phase 1 of
    /// each exchange: its share of the cohort).
    pub twophase_updates: Counter,
    /// Running jobs this node serves (each holds one of its `--max-jobs` slots).
    pub jobs_served: Gauge,
    /// Running jobs waiting for a free slot on this node.
    pub jobs_waiting: Gauge,
    /// Jobs this node did not take when it learned of them because every slot was taken.
    pub jobs_refused: Counter,
    /// Fencing events, by kind ([`Metrics::FENCING_EVENTS`]).
    pub fencing: Family<EventLabel, Counter>,
    /// Strategy states a taking-over top restored, by outcome (`restored`, `missing`,
    /// `refused`, `unreadable`).
    pub strategy_state_restores: Family<EventLabel, Counter>,
    /// Updates the gateway adopted from a dead node's claims (read from the stream by sequence
    /// instead of waiting for JetStream to redeliver them).
    pub updates_adopted: Counter,
    /// Seconds the gateway spent taking updates in (after admission: reading an upload's
    /// chunks, copying into the slot, checking, claiming, handing to the host), summed over
    /// updates. One gateway takes one update at a time, so this over the round's length is
    /// its busy fraction.
    pub ingest_stage_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Of [`Self::ingest_stage_seconds`], the seconds spent on the claim's KV round trips.
    pub ingest_claim_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Seconds the leaves spent folding (the strategy's fold kernels on their blocking
    /// threads), summed over batches.
    pub fold_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Updates folded while they were staged (fold-while-staging, [`crate::staging::stream`]).
    pub updates_folded_while_staged: Counter,
    /// Partials given up because a streamed update failed after part of it was folded (their
    /// updates were handed back and folded again).
    pub partials_spoiled: Counter,
    /// Descriptor-channel frames and connections refused, by reason
    /// ([`crate::host::channel::ChannelErrorKind`]).
    pub descriptor_channel_errors: Family<ReasonLabel, Counter>,
    /// Descriptors the gateway sent to function hosts over descriptor channels.
    pub descriptors_sent: Counter,
    /// Release records the gateway received from function hosts.
    pub releases_received: Counter,
    /// Function-host processes connected to this gateway.
    pub function_hosts: Gauge,
    /// Function hosts serving each job on this gateway's node.
    pub function_hosts_per_job: Family<JobLabel, Gauge>,
    /// Function-host processes this gateway spawned (cold starts of a process).
    pub function_host_spawns: Counter,
    /// Function-host processes this gateway stopped after their idle timeout (scale to zero).
    pub function_host_stops: Counter,
    /// Seconds from spawning a function-host process to its channel's handshake.
    pub function_host_cold_start_seconds: Histogram,
    /// Seconds from spawning a function-host process to its first fold (the first progress
    /// report of the job it was spawned for): the cold start a round sees.
    pub function_host_first_fold_seconds: Histogram,
    /// Function hosts abandoned as hung: a harvest or a descriptor not answered within the
    /// bound (`--host-harvest-timeout-ms`); what they held was handed back, a spawned one killed.
    pub function_host_hangs: Counter,
    /// Descriptor-channel messages (one per frame) counted by the eBPF sidecar, by function and
    /// direction, summed over CPUs every counter tick ([`crate::dataplane`]).
    pub descriptor_messages: Family<FunctionDirectionLabel, Counter>,
    /// Their bytes (frames: 4-byte length, type byte, body).
    pub descriptor_bytes: Family<FunctionDirectionLabel, Counter>,
    /// Of [`Self::descriptor_messages`], those SK_MSG moved straight into the peer socket.
    pub descriptor_messages_redirected: Family<FunctionDirectionLabel, Counter>,
    /// Descriptor-channel frames a gateway wrote to and read from each function-host process
    /// (its own count, with or without the eBPF sidecar; the welcome included, the hello not).
    pub channel_frames: Family<FunctionFrameLabel, Counter>,
    /// Their bytes (4-byte length, type byte, body).
    pub channel_frame_bytes: Family<FunctionFrameLabel, Counter>,
    /// 1 while the eBPF sidecar's programs are attached, else 0.
    pub ebpf_attached: Gauge,
    /// 1 while descriptors are redirected (sidecar attached, kill switch on), else 0.
    pub ebpf_redirect: Gauge,
    log_state: Mutex<HashMap<RejectReason, (u64, Instant)>>,
}

impl Metrics {
    fn register_ingest(&self, registry: &mut Registry) {
        registry.register(
            "updates_staged",
            "Client updates staged in shared memory",
            self.updates_staged.clone(),
        );
        registry.register(
            "bytes_staged",
            "Bytes of client updates staged in shared memory",
            self.bytes_staged.clone(),
        );
        registry.register(
            "ingest_stage_seconds",
            "Seconds the gateway spent taking admitted updates in (upload read, slot copy, checks, claim, hand-off)",
            self.ingest_stage_seconds.clone(),
        );
        registry.register(
            "ingest_claim_seconds",
            "Seconds the gateway spent on update claims in KV",
            self.ingest_claim_seconds.clone(),
        );
        registry.register(
            "fold_seconds",
            "Seconds the leaves spent folding updates",
            self.fold_seconds.clone(),
        );
        registry.register(
            "updates_folded_while_staged",
            "Updates folded piece by piece while the gateway staged them",
            self.updates_folded_while_staged.clone(),
        );
        registry.register(
            "partials_spoiled",
            "Partials given up (their updates folded again) because a streamed update failed half-folded",
            self.partials_spoiled.clone(),
        );
        registry.register(
            "updates_rejected",
            "Client updates rejected, by reason",
            self.updates_rejected.clone(),
        );
        registry.register("rounds", "Rounds ended, by job and outcome", self.rounds.clone());
        registry.register(
            "update_staleness",
            "Staleness (model versions behind) of the client updates staged",
            self.update_staleness.clone(),
        );
        registry.register(
            "aggregator_cold_starts",
            "Aggregator actors started on demand",
            self.cold_starts.clone(),
        );
        registry.register(
            "aggregator_warm_reuses",
            "Aggregator actors reused for a new round",
            self.warm_reuses.clone(),
        );
        registry.register("aggregators", "Aggregators alive on this node, by tier", self.aggregators.clone());
        registry.register(
            "aggregator_cold_start_seconds",
            "Seconds from an update reaching the function host to a new aggregator handling it",
            self.cold_start_seconds.clone(),
        );
        registry.register(
            "aggregator_warm_reuse_seconds",
            "Seconds from an update reaching the function host to a reused aggregator handling it",
            self.warm_reuse_seconds.clone(),
        );
        registry.register(
            "updates_already_applied",
            "Update messages delivered again after a committed model included them (acked, not folded again)",
            self.updates_already_applied.clone(),
        );
    }

    fn register_hosts(&self, registry: &mut Registry) {
        registry.register(
            "function_hosts",
            "Function-host processes connected to this gateway",
            self.function_hosts.clone(),
        );
        registry.register(
            "function_hosts_per_job",
            "Function hosts serving each job on this node",
            self.function_hosts_per_job.clone(),
        );
        registry.register(
            "function_host_spawns",
            "Function-host processes spawned by this gateway (process cold starts)",
            self.function_host_spawns.clone(),
        );
        registry.register(
            "function_host_stops",
            "Function-host processes stopped after their idle timeout (scale to zero)",
            self.function_host_stops.clone(),
        );
        registry.register(
            "function_host_cold_start_seconds",
            "Seconds from spawning a function-host process to its channel handshake",
            self.function_host_cold_start_seconds.clone(),
        );
        registry.register(
            "function_host_first_fold_seconds",
            "Seconds from spawning a function-host process to its first fold",
            self.function_host_first_fold_seconds.clone(),
        );
        registry.register(
            "function_host_hangs",
            "Function hosts abandoned because a harvest or a descriptor was not answered in time (spawned ones killed)",
            self.function_host_hangs.clone(),
        );
    }

    fn register_cluster(&self, registry: &mut Registry) {
        registry.register(
            "slow_consumer_events",
            "Slow-consumer events of the node's NATS connection (messages dropped from a full subscription buffer)",
            self.slow_consumer_events.clone(),
        );
        registry.register(
            "nats_disconnects",
            "Losses of the node's NATS connection (a server-side slow-consumer cut-off is one)",
            self.nats_disconnects.clone(),
        );
        registry.register(
            "partial_bytes_sent",
            "Bytes of partial aggregates sent to other nodes",
            self.partial_bytes_sent.clone(),
        );
        registry.register(
            "shard_bytes_sent",
            "Bytes of update slices and shard results sent in coordinate-sharded exchanges",
            self.shard_bytes_sent.clone(),
        );
        registry.register(
            "shard_bytes_received",
            "Bytes of update slices and shard results received in coordinate-sharded exchanges",
            self.shard_bytes_received.clone(),
        );
        registry.register(
            "twophase_bytes_sent",
            "Bytes sent to other nodes in two-phase exchanges (RFFL, Bristle): requests once per node asked, answers",
            self.twophase_bytes_sent.clone(),
        );
        registry.register(
            "twophase_bytes_received",
            "Bytes received from other nodes in two-phase exchanges (RFFL, Bristle)",
            self.twophase_bytes_received.clone(),
        );
        registry.register(
            "twophase_updates",
            "Updates this node read from its own shared memory in two-phase exchanges (its share of each cohort)",
            self.twophase_updates.clone(),
        );
        registry.register(
            "consumer_restarts",
            "Times the gateway opened its pull consumer again after it ended, failed or stalled",
            self.consumer_restarts.clone(),
        );
        registry.register(
            "partial_bytes_received",
            "Bytes of partial aggregates received from other nodes",
            self.partial_bytes_received.clone(),
        );
        registry.register("jobs_served", "Running jobs this node serves", self.jobs_served.clone());
        registry.register(
            "jobs_waiting",
            "Running jobs waiting for a free slot on this node (--max-jobs)",
            self.jobs_waiting.clone(),
        );
        registry.register(
            "jobs_refused",
            "Jobs not taken when first seen because the node serves its --max-jobs already",
            self.jobs_refused.clone(),
        );
        registry.register(
            "fencing_events",
            "Fencing: self_fenced (a lease renewal gap), partial_withheld and commit_withheld \
             (continuity not proven), duplicate_seq and stale_contributor (collections the top \
             refused), conflict_dropped (a leaf whose claim was not the stored one)",
            self.fencing.clone(),
        );
        registry.register(
            "strategy_state_restores",
            "Strategy states (reputations, optimizer moments) a taking-over top read back, by \
             event: restored, missing, refused, unreadable",
            self.strategy_state_restores.clone(),
        );
        registry.register(
            "updates_adopted",
            "Updates adopted from a dead node's claims by reading them from the stream",
            self.updates_adopted.clone(),
        );
        registry.register(
            "descriptor_channel_errors",
            "Descriptor-channel connections, frames and descriptors refused (wrong_version, malformed, truncated, frame_length, refused; stale_slot, slot_out_of_range, segment, io, decode)",
            self.descriptor_channel_errors.clone(),
        );
        registry.register(
            "descriptor_channel_descriptors_sent",
            "Descriptors the gateway sent to function-host processes over descriptor channels",
            self.descriptors_sent.clone(),
        );
        registry.register(
            "descriptor_channel_releases_received",
            "Slot release records the gateway received from function-host processes",
            self.releases_received.clone(),
        );
        registry.register(
            "round_latency_seconds",
            "Seconds from the last accepted update of a round to its commit, by job",
            self.round_latency.clone(),
        );
    }
}

impl Metrics {
    fn register_dataplane(&self, registry: &mut Registry) {
        registry.register(
            "descriptor_messages",
            "Descriptor-channel messages counted by the eBPF sidecar, by function and direction (to_host: descriptors; to_gateway: releases and settles; function=unregistered: handshakes)",
            self.descriptor_messages.clone(),
        );
        registry.register(
            "descriptor_bytes",
            "Bytes of those descriptor-channel messages, by function and direction",
            self.descriptor_bytes.clone(),
        );
        registry.register(
            "descriptor_messages_redirected",
            "Descriptor-channel messages the eBPF sidecar redirected into the peer socket (the rest took plain TCP)",
            self.descriptor_messages_redirected.clone(),
        );
        registry.register(
            "descriptor_channel_frames",
            "Descriptor-channel frames the gateway wrote to (to_host) and read from (to_gateway) each function-host process, by frame type (its own count, eBPF or not)",
            self.channel_frames.clone(),
        );
        registry.register(
            "descriptor_channel_frame_bytes",
            "Bytes of those frames (length prefix and type byte included)",
            self.channel_frame_bytes.clone(),
        );
        registry.register(
            "ebpf_sidecar_attached",
            "1 while the eBPF sidecar's programs are attached (--ebpf), else 0",
            self.ebpf_attached.clone(),
        );
        registry.register(
            "ebpf_redirect_enabled",
            "1 while descriptors are redirected by SK_MSG (sidecar attached and the kill switch on), else 0",
            self.ebpf_redirect.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("shoal");
        let m = Metrics {
            updates_staged: Counter::default(),
            bytes_staged: Counter::default(),
            updates_rejected: Family::default(),
            rounds: Family::default(),
            cold_starts: Counter::default(),
            warm_reuses: Counter::default(),
            aggregators: Family::default(),
            round_latency: Family::new_with_constructor(round_latency_histogram),
            update_staleness: Histogram::new(STALENESS_BUCKETS.into_iter()),
            cold_start_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 24)),
            warm_reuse_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 24)),
            updates_already_applied: Counter::default(),
            slow_consumer_events: Counter::default(),
            nats_disconnects: Counter::default(),
            partial_bytes_sent: Counter::default(),
            partial_bytes_received: Counter::default(),
            consumer_restarts: Counter::default(),
            shard_bytes_sent: Counter::default(),
            shard_bytes_received: Counter::default(),
            twophase_bytes_sent: Counter::default(),
            twophase_bytes_received: Counter::default(),
            twophase_updates: Counter::default(),
            jobs_served: Gauge::default(),
            jobs_waiting: Gauge::default(),
            jobs_refused: Counter::default(),
            fencing: Family::default(),
            strategy_state_restores: Family::default(),
            updates_adopted: Counter::default(),
            ingest_stage_seconds: Counter::default(),
            ingest_claim_seconds: Counter::default(),
            fold_seconds: Counter::default(),
            updates_folded_while_staged: Counter::default(),
            partials_spoiled: Counter::default(),
            descriptor_channel_errors: Family::default(),
            descriptors_sent: Counter::default(),
            releases_received: Counter::default(),
            function_hosts: Gauge::default(),
            function_hosts_per_job: Family::default(),
            function_host_spawns: Counter::default(),
            function_host_stops: Counter::default(),
            function_host_cold_start_seconds: Histogram::new(exponential_buckets(1e-3, 2.0, 16)),
            function_host_first_fold_seconds: Histogram::new(exponential_buckets(1e-3, 2.0, 16)),
            function_host_hangs: Counter::default(),
            descriptor_messages: Family::default(),
            descriptor_bytes: Family::default(),
            descriptor_messages_redirected: Family::default(),
            channel_frames: Family::default(),
            channel_frame_bytes: Family::default(),
            ebpf_attached: Gauge::default(),
            ebpf_redirect: Gauge::default(),
            log_state: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        m.register_ingest(&mut registry);
        m.register_cluster(&mut registry);
        m.register_hosts(&mut registry);
        m.register_dataplane(&mut registry);
        for tier in ["leaf", "middle", "top"] {
            let _ = m.aggregators.get_or_create(&TierLabel { tier }).get();
        }
        for event in Metrics::FENCING_EVENTS {
            let _ = m.fencing.get_or_create(&EventLabel { event }).get();
        }
        for k in crate::host::channel::ChannelErrorKind::ALL {
            let _ = m.descriptor_channel_errors.get_or_create(&ReasonLabel { reason: k.as_str() }).get();
        }
        for r in RejectReason::ALL {
            let _ = m.updates_rejected.get_or_create(&ReasonLabel { reason: r.as_str() }).get();
        }
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts a rejection and says whether to log it: the first of each reason, then at most
    /// once a minute per reason (with the count since), so a flood cannot flood the log.
    pub fn reject(&self, reason: RejectReason) -> Option<u64> {
        self.updates_rejected.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc();
        let mut st = self.log_state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match st.get_mut(&reason) {
            None => {
                st.insert(reason, (0, now));
                Some(1)
            }
            Some((suppressed, last)) => {
                *suppressed += 1;
                if now.duration_since(*last) >= Duration::from_secs(60) {
                    let n = *suppressed;
                    *suppressed = 0;
                    *last = now;
                    Some(n)
                } else {
                    None
                }
            }
        }
    }

    /// The fencing events counted (label values of `shoal_fencing_events_total`).
    pub const FENCING_EVENTS: [&'static str; 6] = [
        "self_fenced",
        "partial_withheld",
        "commit_withheld",
        "duplicate_seq",
        "stale_contributor",
        "conflict_dropped",
    ];

    /// The counter of fencing `event` (one of [`Self::FENCING_EVENTS`]).
    pub fn fencing(&self, event: &'static str) -> Counter {
        self.fencing.get_or_create(&EventLabel { event }).clone()
    }

    /// The counter of strategy-state restores with `outcome` (see
    /// [`Self::strategy_state_restores`]).
    pub fn strategy_state_restores(&self, outcome: &'static str) -> Counter {
        self.strategy_state_restores.get_or_create(&EventLabel { event: outcome }).clone()
    }

    /// Counts a refused descriptor-channel connection or frame.
    pub fn channel_error(&self, kind: crate::host::channel::ChannelErrorKind) {
        self.descriptor_channel_errors.get_or_create(&ReasonLabel { reason: kind.as_str() }).inc();
    }

    /// Counts a descriptor a function host refused after checking it against the segments
    /// (`stale_slot`, `slot_out_of_range`, `segment`, `io`, `decode`).
    pub fn descriptor_refused(&self, kind: crate::error::ErrorKind) {
        self.descriptor_channel_errors.get_or_create(&ReasonLabel { reason: kind.as_str() }).inc();
    }

    /// The gauge of aggregators of `tier`.
    pub fn tier(&self, tier: &'static str) -> Gauge {
        self.aggregators.get_or_create(&TierLabel { tier }).clone()
    }

    /// Rejections counted for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.updates_rejected.get_or_create(&ReasonLabel { reason: reason.as_str() }).get()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Reads one counter value from a Prometheus text exposition (for tests and `shoal job status`).
pub fn scrape(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// The sum of metric `name` over all its label sets in Prometheus `text` (a labelled family
/// such as `shoal_round_latency_seconds_sum{job=...}`, or the unlabelled sample); `None` when
/// no sample of it is there.
pub fn scrape_sum(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None; // another metric whose name starts with this one
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .reduce(|a, b| a + b)
}

/// The gateway's tally of one descriptor channel's frames ([`Metrics::channel_frames`] and
/// [`Metrics::channel_frame_bytes`] of one function host): the label lookups happen once per
/// frame type and direction, not once per frame.
#[derive(Debug)]
pub struct ChannelTally {
    metrics: std::sync::Arc<Metrics>,
    function: shoal_proto::FunctionId,
    /// `[direction][frame type]` (frame types above 15 share slot 0 with the other unknowns).
    cells: [[std::sync::OnceLock<(Counter, Counter)>; 16]; 2],
}

impl ChannelTally {
    /// The tally of function host `function`'s channel.
    pub fn new(metrics: std::sync::Arc<Metrics>, function: shoal_proto::FunctionId) -> ChannelTally {
        ChannelTally { metrics, function, cells: Default::default() }
    }

    /// Counts a frame of type `kind` and `bytes` bytes the gateway wrote to the host.
    pub fn to_host(&self, kind: u8, bytes: usize) {
        self.count(0, kind, bytes);
    }

    /// Counts a frame of type `kind` and `bytes` bytes the gateway read from the host.
    pub fn to_gateway(&self, kind: u8, bytes: usize) {
        self.count(1, kind, bytes);
    }

    fn count(&self, direction: usize, kind: u8, bytes: usize) {
        let slot = if usize::from(kind) < 16 { usize::from(kind) } else { 0 };
        let (frames, total) = self.cells[direction][slot].get_or_init(|| {
            let label = FunctionFrameLabel {
                function: self.function.0.to_string(),
                direction: ["to_host", "to_gateway"][direction],
                frame: crate::host::channel::frame_name(kind),
            };
            (
                self.metrics.channel_frames.get_or_create(&label).clone(),
                self.metrics.channel_frame_bytes.get_or_create(&label).clone(),
            )
        });
        frames.inc();
        total.inc_by(bytes as u64);
    }
}
