//! The node's view of the jobs in KV `shoal-jobs`: the in-process [`JobDirectory`] the gateway
//! validates against, kept fresh by a KV watch (and by the local coordinator, which updates it
//! before announcing a round). The job store itself (create, load, compare-and-set, models) is
//! `shoal_client::jobs`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use shoal_functions::{JobId, JobSpec};
use shoal_proto::config::{ms, Timings};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::nats::Infra;
use shoal_proto::cluster::CommitRecord;
use shoal_proto::subjects;
use shoal_proto::JobState;

/// A job as the node knows it.
#[derive(Debug, Clone)]
pub struct JobEntry {
    /// The immutable spec.
    pub spec: Arc<JobSpec>,
    /// The spec's manifest, shared (built once per job, not per update).
    pub manifest: Arc<shoal_functions::ModelManifest>,
    /// Latest known state.
    pub state: JobState,
    /// KV revision of `state`.
    pub revision: u64,
    /// Whether the job's updates must all be staged on its top's node: whole-cohort strategies
    /// that run on one node (any under a server optimizer). Median, trimmed mean and Krum run a
    /// coordinate-sharded exchange and RFFL and Bristle the two-phase protocol: not pinned.
    pub pinned: bool,
    /// Which life of the job id this is, in this process: a job deleted (`shoal job delete`)
    /// and created again under the same id gets a new incarnation, so that per-job state kept
    /// by the gateway, the host, the leaf and the top for the old one is not applied to it.
    pub incarnation: u64,
}

/// Source of [`JobEntry::incarnation`]s (process-wide, never reused).
static INCARNATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Commit records kept per job, so a leaf that missed a state revision still finds the record
/// of the round it holds updates for.
const COMMIT_HISTORY: usize = 64;

/// The node's view of every job, shared by gateway, leaves and coordinators.
#[derive(Debug, Clone)]
pub struct JobDirectory {
    inner: Arc<RwLock<HashMap<JobId, Arc<JobEntry>>>>,
    commits: Arc<RwLock<HashMap<JobId, std::collections::VecDeque<CommitRecord>>>>,
    tops: Arc<RwLock<HashMap<JobId, shoal_functions::NodeId>>>,
    /// Bumped on every state change of any job ([`Self::subscribe`]).
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for JobDirectory {
    fn default() -> Self {
        JobDirectory {
            inner: Arc::default(),
            commits: Arc::default(),
            tops: Arc::default(),
            changed: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl JobDirectory {
    /// A job's entry (shared: a new state replaces the entry, nothing is copied per lookup).
    pub fn get(&self, job: &JobId) -> Option<Arc<JobEntry>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).get(job).cloned()
    }

    /// The record of how `round` of `job` closed, if this node has seen it.
    pub fn commit_record(&self, job: &JobId, round: shoal_functions::RoundId) -> Option<CommitRecord> {
        let commits = self.commits.read().unwrap_or_else(|p| p.into_inner());
        commits.get(job)?.iter().rev().find(|c| c.round == round).cloned()
    }

    /// The round whose commit (among those this node has seen) applied the update message with
    /// stream sequence `seq`.
    pub fn applied(&self, job: &JobId, seq: u64) -> Option<shoal_functions::RoundId> {
        let commits = self.commits.read().unwrap_or_else(|p| p.into_inner());
        commits.get(job)?.iter().find(|c| c.includes(seq)).map(|c| c.round)
    }

    /// Records which node holds `job`'s top lease (`None`: unknown or none).
    pub fn set_top(&self, job: &JobId, node: Option<shoal_functions::NodeId>) {
        let mut tops = self.tops.write().unwrap_or_else(|p| p.into_inner());
        match node {
            Some(n) => tops.insert(job.clone(), n),
            None => tops.remove(job),
        };
    }

    /// The node last seen holding `job`'s top lease.
    pub fn top(&self, job: &JobId) -> Option<shoal_functions::NodeId> {
        self.tops.read().unwrap_or_else(|p| p.into_inner()).get(job).cloned()
    }

    /// A receiver whose `changed()` resolves after each state change of any job (a change
    /// that happens while the holder is busy is not lost: it resolves at the next wait).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Records a state if it is newer than the known one.
    pub fn observe_state(&self, job: &JobId, spec: Option<Arc<JobSpec>>, state: JobState, revision: u64) {
        if let Some(c) = &state.last_commit {
            let mut commits = self.commits.write().unwrap_or_else(|p| p.into_inner());
            let history = commits.entry(job.clone()).or_default();
            if !history.contains(c) {
                history.push_back(c.clone());
                if history.len() > COMMIT_HISTORY {
                    history.pop_front();
                }
            }
        }
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(job) {
            Some(e) if e.revision < revision => {
                let next = JobEntry {
                    spec: Arc::clone(&e.spec),
                    manifest: Arc::clone(&e.manifest),
                    state,
                    revision,
                    pinned: e.pinned,
                    incarnation: e.incarnation,
                };
                *e = Arc::new(next);
            }
            Some(_) => {}
            None => {
                if let Some(spec) = spec {
                    let manifest = Arc::new(spec.manifest.clone());
                    let pinned = shoal_functions::factory::build_strategy(&spec).map_or(true, |s| {
                        s.mergeability() == shoal_functions::Mergeability::WholeCohort
                            && s.sharding() == shoal_functions::Sharding::Unsupported
                    });
                    let incarnation = INCARNATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let entry = JobEntry { spec, manifest, state, revision, pinned, incarnation };
                    map.insert(job.clone(), Arc::new(entry));
                }
            }
        }
        drop(map);
        // After the update: a waiter woken by this sees the new state.
        self.notify();
    }

    /// Forgets a deleted job: its entry, commit records and top. A job created again under the
    /// same id is a new entry with a new [`JobEntry::incarnation`].
    pub fn forget(&self, job: &JobId) {
        self.inner.write().unwrap_or_else(|p| p.into_inner()).remove(job);
        self.commits.write().unwrap_or_else(|p| p.into_inner()).remove(job);
        self.tops.write().unwrap_or_else(|p| p.into_inner()).remove(job);
        self.notify();
    }

    /// Whether `job` is still the incarnation `incarnation` and running (what a job's leaf and
    /// top check before acting on it).
    pub fn runs(&self, job: &JobId, incarnation: u64) -> bool {
        self.get(job)
            .is_some_and(|e| e.incarnation == incarnation && e.state.phase == shoal_proto::JobPhase::Running)
    }

    /// Jobs known.
    pub fn jobs(&self) -> Vec<JobId> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }
}

pub use shoal_client::jobs::{
    cas_state, chunk_size, create_job, get_model_bytes, get_strategy_state, load_model, load_spec,
    load_state, put_model, put_model_streamed, put_strategy_state, CasOutcome,
};

/// Observes every state revision still in the history of `job`'s state key (the last few
/// rounds), so that their commit records are known even when the watch skipped them.
///
/// # Errors
/// NATS errors reading the history.
pub async fn observe_history(
    infra: &Infra,
    dir: &JobDirectory,
    job: &JobId,
    spec: Option<Arc<JobSpec>>,
) -> Result<()> {
    let mut history = infra
        .jobs
        .history(subjects::job_state_key(job))
        .await
        .map_err(|e| Error::nats("read job history", e))?;
    while let Some(e) = history.next().await {
        let e = e.map_err(|e| Error::nats("read job history", e))?;
        if let Ok(s) = shoal_proto::decode::<JobState>("job state", &e.value) {
            dir.observe_state(job, spec.clone(), s, e.revision);
        }
    }
    Ok(())
}

/// Reads the state of every known job and catches up with any revision the watch missed;
/// returns the jobs found deleted (forgotten here).
async fn resync_states(infra: &Infra, dir: &JobDirectory) -> Vec<JobId> {
    let mut deleted = Vec::new();
    for job in dir.jobs() {
        let Some(known) = dir.get(&job) else { continue };
        match load_state(&infra, &job).await {
            Err(shoal_client::Error::UnknownJob(_)) => {
                tracing::info!(%job, "job deleted");
                dir.forget(&job);
                deleted.push(job);
            }
            Ok((_, revision)) if revision > known.revision => {
                tracing::warn!(%job, revision, known = known.revision, "job watch lagging; caught up from KV");
                if let Err(e) = observe_history(infra, dir, &job, None).await {
                    tracing::debug!(%job, error = %e, "reading the job history failed");
                }
            }
            _ => {}
        }
    }
    deleted
}

/// Keeps `dir` in step with KV until cancelled; calls `on_new_job` for each job whose state
/// appears (so the node can start its coordinator). The watch is restarted when it ends or
/// fails, and checked every `timings.state_resync_ms` against KV (a watch can stall silently:
/// its consumer is not always recreated after a nats-server restart).
///
/// # Errors
/// None today: watch failures are retried (the `Result` is kept for callers).
pub async fn watch_jobs(
    infra: Infra,
    dir: JobDirectory,
    timings: Timings,
    cancel: CancellationToken,
    on_new_job: impl Fn(JobId) + Send + 'static,
) -> Result<()> {
    let mut resync = tokio::time::interval(ms(timings.state_resync_ms));
    // Jobs handed to `on_new_job`. Not "known to the directory": the gateway may have put a job
    // there first (read from KV for an update that came before this watch's entry), and that
    // job must still get its leaf and top.
    let mut started = std::collections::HashSet::new();
    loop {
        // Last value of every key first (jobs that exist already, e.g. after a restart), then
        // changes.
        let mut watch = match infra.jobs.watch_with_history("*.state").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "starting the job watch failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(ms(timings.retry_ms)) => continue,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = resync.tick() => {
                    for job in resync_states(&infra, &dir).await {
                        started.remove(&job);
                    }
                    continue;
                }
                e = watch.next() => e,
            };
            let entry = match entry {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "job watch error; restarting the watch");
                    break;
                }
                None => {
                    tracing::warn!("job watch ended; restarting it");
                    break;
                }
            };
            let Some(job) = entry.key.strip_suffix(".state").and_then(|j| JobId::new(j).ok()) else {
                continue;
            };
            if entry.operation != async_nats::jetstream::kv::Operation::Put {
                // Deleted (`shoal job delete`): forget it, so the id can start a new job.
                if dir.get(&job).is_some() {
                    tracing::info!(%job, "job deleted");
                }
                dir.forget(&job);
                started.remove(&job);
                continue;
            }
            let Ok(state) = shoal_proto::decode::<JobState>("job state", &entry.value) else {
                tracing::warn!(key = %entry.key, "undecodable job state ignored");
                continue;
            };
            let known = dir.get(&job).is_some();
            let spec = if known {
                None
            } else {
                match load_spec(&infra, &job).await {
                    Ok(s) => {
                        let spec = Arc::new(s);
                        // The key's history holds the commit records of the last rounds: a node
                        // (re)started now still recognises their updates when they are
                        // delivered again.
                        if let Err(e) = observe_history(&infra, &dir, &job, Some(Arc::clone(&spec))).await {
                            tracing::debug!(%job, error = %e, "reading the job history failed");
                        }
                        Some(spec)
                    }
                    Err(e) => {
                        tracing::warn!(%job, error = %e, "job spec unreadable; job ignored");
                        continue;
                    }
                }
            };
            dir.observe_state(&job, spec, state, entry.revision);
            if dir.get(&job).is_some() && started.insert(job.clone()) {
                on_new_job(job);
            }
        }
    }
}
