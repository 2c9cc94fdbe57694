//! Every NATS subject, stream, bucket, key and object name Shoal uses is built here, and
//! nowhere else (DESIGN.md §4).
//!
//! The prefix (`--prefix`, default `shoal`) names everything of one deployment, so several
//! deployments can share a NATS account without seeing each other's jobs: subjects
//! `<p>.<job>...`, streams `<P>_UPDATES` and `<P>_UPLOADS_<job>` (`P` the prefix in upper case),
//! buckets `<p>-jobs`, `<p>-models`, `<p>-updates`, `<p>-claims` (streams `KV_<bucket>`,
//! `OBJ_<bucket>`) and the consumer `<p>-gateway`. The default prefix keeps the names Shoal has
//! always used: `SHOAL_UPDATES`, `shoal-jobs`, ..., and upload streams `UPLOADS_<job>`. A
//! prefix is 1–32 characters of `[a-z0-9_-]` ([`validate_prefix`]): lower case, so that two
//! prefixes never map to one stream name.

use crate::ids::{ClientId, CollectId, ExchangeId, JobId, ModelVersion, NodeId, RoundId};

/// Default subject prefix.
pub const DEFAULT_PREFIX: &str = "shoal";
/// The default prefix's work-queue stream of client updates ([`Subjects::updates_stream`]).
pub const UPDATES_STREAM: &str = "SHOAL_UPDATES";
/// The default prefix's object store of node-to-node transfers
/// ([`Subjects::update_objects_bucket`]).
pub const UPDATES_BUCKET: &str = "shoal-updates";
/// The default prefix's object store of committed models ([`Subjects::models_bucket`]).
pub const MODELS_BUCKET: &str = "shoal-models";
/// The default prefix's KV bucket of job specs and states ([`Subjects::jobs_bucket`]).
pub const JOBS_BUCKET: &str = "shoal-jobs";
/// The default prefix's KV bucket of update claims ([`Subjects::claims_bucket`]).
pub const CLAIMS_BUCKET: &str = "shoal-claims";
/// The default prefix's durable pull consumer shared by every gateway
/// ([`Subjects::gateway_consumer`]).
pub const GATEWAY_CONSUMER: &str = "shoal-gateway";

/// Longest prefix accepted (stream names built from it stay well under NATS's limits).
pub const MAX_PREFIX_LEN: usize = 32;

/// Checks a prefix: 1–[`MAX_PREFIX_LEN`] characters of `[a-z0-9_-]`.
///
/// # Errors
/// What is wrong, for a message.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "prefix {prefix:?} must be 1-{MAX_PREFIX_LEN} characters of [a-z0-9_-] (one subject token; \
             lower case, because stream names are the prefix in upper case)"
        ))
    }
}

/// Subject and resource-name builder for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects { prefix: DEFAULT_PREFIX.to_string() }
    }
}

impl Subjects {
    /// Names under `prefix` (see [`validate_prefix`]; connecting and `NodeConfig::validate`
    /// refuse an invalid one).
    pub fn new(prefix: impl Into<String>) -> Subjects {
        Subjects { prefix: prefix.into() }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn is_default(&self) -> bool {
        self.prefix == DEFAULT_PREFIX
    }

    /// The work-queue stream of client updates: `<P>_UPDATES` (`SHOAL_UPDATES`).
    pub fn updates_stream(&self) -> String {
        format!("{}_UPDATES", self.prefix.to_ascii_uppercase())
    }

    /// A job's upload stream: `<P>_UPLOADS_<job>`; `UPLOADS_<job>` under the default prefix.
    pub fn uploads_stream(&self, job: &JobId) -> String {
        if self.is_default() {
            format!("UPLOADS_{job}")
        } else {
            format!("{}_UPLOADS_{job}", self.prefix.to_ascii_uppercase())
        }
    }

    /// The object store of node-to-node transfers: `<p>-updates`.
    pub fn update_objects_bucket(&self) -> String {
        format!("{}-updates", self.prefix)
    }

    /// The object store of committed models: `<p>-models`.
    pub fn models_bucket(&self) -> String {
        format!("{}-models", self.prefix)
    }

    /// The KV bucket of job specs, states and leases: `<p>-jobs`.
    pub fn jobs_bucket(&self) -> String {
        format!("{}-jobs", self.prefix)
    }

    /// The KV bucket of update claims: `<p>-claims`.
    pub fn claims_bucket(&self) -> String {
        format!("{}-claims", self.prefix)
    }

    /// The durable pull consumer every gateway shares: `<p>-gateway`.
    pub fn gateway_consumer(&self) -> String {
        format!("{}-gateway", self.prefix)
    }

    /// `<p>.<job>.update.<client>`: where a client publishes its update.
    pub fn update(&self, job: &JobId, client: &ClientId) -> String {
        format!("{}.{job}.update.{client}", self.prefix)
    }

    /// `<p>.<job>.update.*`: every update of one job (what deleting the job purges).
    pub fn job_updates(&self, job: &JobId) -> String {
        format!("{}.{job}.update.*", self.prefix)
    }

    /// `<p>.*.update.*`: the stream's subject filter.
    pub fn all_updates(&self) -> String {
        format!("{}.*.update.*", self.prefix)
    }

    /// Parses `<p>.<job>.update.<client>` into its ids.
    pub fn parse_update(&self, subject: &str) -> Option<(JobId, ClientId)> {
        let mut it = subject.split('.');
        if it.next()? != self.prefix {
            return None;
        }
        let job = JobId::new(it.next()?).ok()?;
        if it.next()? != "update" {
            return None;
        }
        let client = ClientId::new(it.next()?).ok()?;
        it.next().is_none().then_some((job, client))
    }

    /// `<p>.<job>.upload.<client>.<round>.<i>`: chunk `i` (from 0) of a client's upload for a
    /// round (stream `UPLOADS_<job>`, one message per subject).
    pub fn upload_chunk(&self, job: &JobId, client: &ClientId, round: RoundId, i: u64) -> String {
        format!("{}.{job}.upload.{client}.{round}.{i}", self.prefix)
    }

    /// `<p>.<job>.upload.<client>.<round>.>`: every chunk of one upload (what the node purges
    /// when the update is settled).
    pub fn upload_chunks(&self, job: &JobId, client: &ClientId, round: RoundId) -> String {
        format!("{}.{job}.upload.{client}.{round}.>", self.prefix)
    }

    /// `<p>.<job>.upload.*.<round>.>`: every client's upload for a round (what the committer of
    /// a synchronous round purges when it closes: left-overs of crashed or retried uploads).
    pub fn round_uploads(&self, job: &JobId, round: RoundId) -> String {
        format!("{}.{job}.upload.*.{round}.>", self.prefix)
    }

    /// `<p>.<job>.upload.<client>.>`: what client `client` may publish uploads to.
    pub fn uploads_of(&self, job: &JobId, client: &ClientId) -> String {
        format!("{}.{job}.upload.{client}.>", self.prefix)
    }

    /// `<p>.<job>.upload.>`: the subjects of the job's upload stream.
    pub fn all_uploads(&self, job: &JobId) -> String {
        format!("{}.{job}.upload.>", self.prefix)
    }

    /// `<p>.<job>.round`: round events.
    pub fn round_events(&self, job: &JobId) -> String {
        format!("{}.{job}.round", self.prefix)
    }

    /// `<p>.<job>.rejected.<client>`: rejection notices for one client's updates.
    pub fn rejected(&self, job: &JobId, client: &ClientId) -> String {
        format!("{}.{job}.rejected.{client}", self.prefix)
    }

    /// `<p>.*.rejected.*` or `<p>.<job>.rejected.*`.
    pub fn all_rejected(&self, job: Option<&JobId>) -> String {
        match job {
            Some(j) => format!("{}.{j}.rejected.*", self.prefix),
            None => format!("{}.*.rejected.*", self.prefix),
        }
    }

    /// `<p>.<job>.reward.<client>`: request/reply, a client's personal reward (RFFL).
    pub fn reward(&self, job: &JobId, client: &ClientId) -> String {
        format!("{}.{job}.reward.{client}", self.prefix)
    }

    /// `<p>.<job>.reward.*`: what a job's coordinator answers.
    pub fn all_rewards(&self, job: &JobId) -> String {
        format!("{}.{job}.reward.*", self.prefix)
    }

    /// `<p>.<job>.progress`: leaves' [`crate::cluster::LeafProgress`].
    pub fn progress(&self, job: &JobId) -> String {
        format!("{}.{job}.progress", self.prefix)
    }

    /// `<p>.<job>.collect`: the top's [`crate::cluster::CollectRequest`].
    pub fn collect(&self, job: &JobId) -> String {
        format!("{}.{job}.collect", self.prefix)
    }

    /// `<p>.<job>.partial.<round>.<to>.<tier>`: a partial aggregate of a round for the `tier`
    /// (`top` or `middle`) aggregator on node `to`, so that each partial reaches only its parent
    /// (a node can be both a middle and the top).
    pub fn partial(&self, job: &JobId, round: RoundId, to: &NodeId, tier: &str) -> String {
        format!("{}.{job}.partial.{round}.{to}.{tier}", self.prefix)
    }

    /// `<p>.<job>.partial.*.<node>.<tier>`: every partial for `node`'s `tier` aggregator.
    pub fn partials_to(&self, job: &JobId, node: &NodeId, tier: &str) -> String {
        format!("{}.{job}.partial.*.{node}.{tier}", self.prefix)
    }

    /// `<p>.<job>.shard`: the top's [`crate::cluster::ShardPlan`]s.
    pub fn shard_plans(&self, job: &JobId) -> String {
        format!("{}.{job}.shard", self.prefix)
    }

    /// `<p>.<job>.slice.<node>`: update slices for shard owner `node`.
    pub fn slices_to(&self, job: &JobId, node: &NodeId) -> String {
        format!("{}.{job}.slice.{node}", self.prefix)
    }

    /// `<p>.<job>.shard-result.<node>`: shard results for the top on `node`.
    pub fn shard_results_to(&self, job: &JobId, node: &NodeId) -> String {
        format!("{}.{job}.shard-result.{node}", self.prefix)
    }

    /// `<p>.<job>.phase`: the top's [`crate::twophase::PhaseRequest`]s (RFFL, Bristle).
    pub fn phase_requests(&self, job: &JobId) -> String {
        format!("{}.{job}.phase", self.prefix)
    }

    /// `<p>.<job>.phase-answer.<node>`: nodes' [`crate::twophase::PhaseAnswer`]s for the top on
    /// `node`.
    pub fn phase_answers_to(&self, job: &JobId, node: &NodeId) -> String {
        format!("{}.{job}.phase-answer.{node}", self.prefix)
    }

    /// `<p>.node.<node>.demand`: the node's [`crate::cluster::DemandReport`], every tick.
    pub fn demand(&self, node: &NodeId) -> String {
        format!("{}.node.{node}.demand", self.prefix)
    }

    /// `<p>.node.*.demand`: every node's demand reports (what the operator subscribes to).
    pub fn all_demand(&self) -> String {
        format!("{}.node.*.demand", self.prefix)
    }

    /// `<p>.node.<node>.channel`: request/reply, the gateway answers its descriptor channel's
    /// address (`ip:port`) for function hosts started without `--gateway`.
    pub fn node_channel(&self, node: &NodeId) -> String {
        format!("{}.node.{node}.channel", self.prefix)
    }

    /// `<p>.node.<node>.metrics`: request/reply, answers the Prometheus text exposition.
    pub fn node_metrics(&self, node: &NodeId) -> String {
        format!("{}.node.{node}.metrics", self.prefix)
    }
}

/// KV key of a job's spec.
pub fn job_spec_key(job: &JobId) -> String {
    format!("{job}.spec")
}

/// KV key of a job's state.
pub fn job_state_key(job: &JobId) -> String {
    format!("{job}.state")
}

/// KV key of a node's membership lease: `_node.<id>`.
pub fn node_lease_key(node: &NodeId) -> String {
    format!("_node.{node}")
}

/// KV key filter of every node lease.
pub const NODE_LEASES: &str = "_node.*";

/// KV key (in `shoal-claims`) of a client's update for a round: `<job>.<round>.<client>`.
pub fn claim_key(job: &JobId, round: RoundId, client: &ClientId) -> String {
    format!("{job}.{round}.{client}")
}

/// `<job>.<round>.*`: every claim of a round (a key pattern of KV `shoal-claims`).
pub fn round_claims(job: &JobId, round: RoundId) -> String {
    format!("{job}.{round}.*")
}

/// KV key of a job's top lease: `<job>.top`.
pub fn top_lease_key(job: &JobId) -> String {
    format!("{job}.top")
}

/// Object name (in `shoal-updates`) of a partial too large for one message.
pub fn partial_object(job: &JobId, round: RoundId, node: &NodeId, collect: CollectId) -> String {
    format!("_partials/{job}/{round}/{node}/{:016x}", collect.0)
}

/// Object name (in `shoal-updates`) of an exchange message too large for one message.
pub fn exchange_object(job: &JobId, exchange: ExchangeId, shard: u32, part: &str) -> String {
    format!("_shards/{job}/{:016x}/{shard}/{part}", exchange.0)
}

/// Object name of a committed global model: `<job>/<version>`.
pub fn model_object(job: &JobId, version: ModelVersion) -> String {
    format!("{job}/{version}")
}

/// Object name (in `shoal-models`) of the strategy state committed with model `version`:
/// `<job>/_state/<version>` (reputations, optimizer moments; see `Strategy::save_state`). Keyed
/// by the version it was produced with, so a top that takes over at version v reads exactly the
/// state v's commit left, never v − 1's.
pub fn strategy_state_object(job: &JobId, version: ModelVersion) -> String {
    format!("{job}/_state/{version}")
}

/// Object name of a large update: `<job>/<round>/<client>`.
pub fn update_object(job: &JobId, round: RoundId, client: &ClientId) -> String {
    format!("{job}/{round}/{client}")
}

/// The stream behind object store `bucket`: `OBJ_<bucket>`.
pub fn object_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}

/// The stream behind KV bucket `bucket`: `KV_<bucket>`.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The subject of one object's chunks: `$O.<bucket>.C.<nuid>`.
pub fn object_chunks(bucket: &str, nuid: &str) -> String {
    format!("$O.{bucket}.C.{nuid}")
}

/// The subject of one object's metadata: `$O.<bucket>.M.<base64url(name)>`, as the NATS object
/// store names it.
pub fn object_meta(bucket: &str, name: &str) -> String {
    use base64::Engine as _;
    format!("$O.{bucket}.M.{}", base64::engine::general_purpose::URL_SAFE.encode(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default prefix keeps every historical name; another prefix renames every stream,
    /// bucket and consumer; prefixes that would collide or break a subject are refused.
    #[test]
    fn the_prefix_names_every_resource() {
        let job = JobId::new("mnist").unwrap();
        let d = Subjects::default();
        assert_eq!(d.updates_stream(), UPDATES_STREAM);
        assert_eq!(d.uploads_stream(&job), "UPLOADS_mnist");
        assert_eq!(d.update_objects_bucket(), UPDATES_BUCKET);
        assert_eq!(d.models_bucket(), MODELS_BUCKET);
        assert_eq!(d.jobs_bucket(), JOBS_BUCKET);
        assert_eq!(d.claims_bucket(), CLAIMS_BUCKET);
        assert_eq!(d.gateway_consumer(), GATEWAY_CONSUMER);
        let o = Subjects::new("other");
        assert_eq!(o.updates_stream(), "OTHER_UPDATES");
        assert_eq!(o.uploads_stream(&job), "OTHER_UPLOADS_mnist");
        assert_eq!(
            [
                o.update_objects_bucket(),
                o.models_bucket(),
                o.jobs_bucket(),
                o.claims_bucket(),
                o.gateway_consumer()
            ],
            ["other-updates", "other-models", "other-jobs", "other-claims", "other-gateway"]
        );
        assert_eq!(o.update(&job, &ClientId::new("c").unwrap()), "other.mnist.update.c");
        for good in ["shoal", "a", "team-2_x"] {
            assert!(validate_prefix(good).is_ok(), "{good}");
        }
        for bad in ["", "Other", "a.b", "a b", "a*", "a>", &"x".repeat(33)] {
            assert!(validate_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn update_subjects_round_trip_and_reject_garbage() {
        let s = Subjects::default();
        let (j, c) = (JobId::new("mnist").unwrap(), ClientId::new("c-1").unwrap());
        let subj = s.update(&j, &c);
        assert_eq!(subj, "shoal.mnist.update.c-1");
        assert_eq!(s.parse_update(&subj), Some((j, c)));
        for bad in ["shoal.mnist.update", "x.mnist.update.c", "shoal.mnist.round.c", "shoal.m.update.c.d"] {
            assert_eq!(s.parse_update(bad), None, "{bad}");
        }
    }
}
