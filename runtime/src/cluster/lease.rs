//! Leases in KV `shoal-jobs`: a node's membership (`_node.<id>`, which also keeps two processes
//! from using one node id) and a job's top (`<job>.top`, DESIGN.md §7: one top per job, a dead
//! top replaced when its lease lapses).
//!
//! A lease is a value `{node, instance, renewed_ms}` written by compare-and-set on its KV
//! revision and renewed every `timings.lease_renew_ms`. No two clocks are compared:
//! - **Observers** ([`Liveness`]) judge a lease by its KV revision: a holder is gone when the
//!   revision an observer reads *now, from the stream leader* is one it first saw more than
//!   `timings.lease_stale_ms` ago by its own monotonic clock. Since an observer cannot see a
//!   revision before it is written, and the holder sent that write earlier still, an observer
//!   declares a holder gone no sooner than `stale` after the holder sent its last renewal.
//! - **Holders** ([`Continuity`]) fence themselves by the same bound on their own monotonic
//!   clock: they act on a lease (send a partial, commit) only within the *fence window*
//!   (`stale − stale/3`) after sending their last renewal that was acknowledged, and a renewal
//!   acknowledged more than the fence window after the previous one was sent breaks continuity:
//!   someone may have declared the holder gone in between, so whatever it did under the lease
//!   before is suspect ([`Continuity::holds`] is `false` from then on).
//!
//! The margin (`stale/3`) covers the difference in rate between monotonic clocks (parts per
//! million) with room to spare. A system suspend stops `CLOCK_MONOTONIC` and is not covered:
//! suspend a machine only with its node stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use shoal_proto::config::{ms, Timings};
use shoal_proto::{InstanceId, NodeId};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::nats::Infra;
use shoal_proto::subjects;

pub use shoal_proto::cluster::Lease;

/// The fence window for a stale time: how long after sending an acknowledged renewal a holder
/// may still act on its lease.
pub fn fence_window(stale: Duration) -> Duration {
    stale - stale / 3
}

// ---------------------------------------------------------------------------------------------
// Observers
// ---------------------------------------------------------------------------------------------

/// A lease as read from the stream leader: its value and KV revision.
#[derive(Debug, Clone)]
pub struct Reading {
    /// The lease.
    pub lease: Lease,
    /// Its KV revision (stream sequence).
    pub revision: u64,
}

/// This process's observations of lease revisions: when it first saw each key's current
/// revision, by its monotonic clock. Shared by everything in a node that judges leases.
#[derive(Debug, Clone)]
pub struct Liveness {
    seen: Arc<Mutex<HashMap<String, (u64, Instant)>>>,
    stale: Duration,
}

impl Liveness {
    /// An empty record; holders count as gone once their revision is `stale` old.
    pub fn new(stale: Duration) -> Liveness {
        Liveness { seen: Arc::default(), stale }
    }

    /// Records that `key` has revision `revision` now; returns whether the holder renewed within
    /// the stale time (a revision seen for the first time counts as fresh).
    pub fn observe(&self, key: &str, revision: u64) -> bool {
        self.observe_at(key, revision, Instant::now())
    }

    fn observe_at(&self, key: &str, revision: u64, now: Instant) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get(key) {
            Some(&(r, since)) if r == revision => now.duration_since(since) < self.stale,
            Some(&(r, _)) if r > revision => true, // an older read overtaken by a newer one
            _ => {
                seen.insert(key.to_owned(), (revision, now));
                true
            }
        }
    }

    /// Reads `key` from the stream leader (never a possibly lagging replica): `None` when no
    /// lease is stored.
    ///
    /// # Errors
    /// NATS errors other than "no such key"; an undecodable lease.
    pub async fn read(infra: &Infra, key: &str) -> Result<Option<Reading>> {
        let subject = format!("$KV.{}.{key}", infra.subjects.jobs_bucket());
        let m = match infra.jobs.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(e) => return Err(Error::nats("read lease", e)),
        };
        let deleted =
            m.headers.get("KV-Operation").is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE");
        if deleted || m.payload.is_empty() {
            return Ok(None);
        }
        Ok(Some(Reading { lease: shoal_proto::decode("lease", &m.payload)?, revision: m.sequence }))
    }

    /// The holder of `key` if it is alive: the lease's current revision was first seen by this
    /// process less than the stale time ago.
    ///
    /// # Errors
    /// As [`Self::read`].
    pub async fn holder(&self, infra: &Infra, key: &str) -> Result<Option<Lease>> {
        Ok(Self::read(infra, key).await?.filter(|r| self.observe(key, r.revision)).map(|r| r.lease))
    }

    /// Whether the process `instance` of `node` is alive: its membership lease names it and is
    /// fresh.
    ///
    /// # Errors
    /// As [`Self::read`].
    pub async fn member_alive(&self, infra: &Infra, node: &NodeId, instance: InstanceId) -> Result<bool> {
        let key = subjects::node_lease_key(node);
        Ok(self.holder(infra, &key).await?.is_some_and(|l| l.instance == instance))
    }

    /// The live node processes (fresh membership leases), sorted by node id.
    ///
    /// # Errors
    /// NATS errors listing the bucket.
    pub async fn live_members(&self, infra: &Infra) -> Result<Vec<(NodeId, InstanceId)>> {
        let mut keys = infra.jobs.keys().await.map_err(|e| Error::nats("list node leases", e))?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            match k {
                Ok(k) if k.starts_with("_node.") => names.push(k),
                _ => {}
            }
        }
        let mut out = Vec::new();
        for key in names {
            if let Ok(Some(l)) = self.holder(infra, &key).await {
                out.push((l.node, l.instance));
            }
        }
        out.sort();
        out.dedup_by(|a, b| a.0 == b.0);
        Ok(out)
    }

    /// The live nodes, sorted.
    ///
    /// # Errors
    /// As [`Self::live_members`].
    pub async fn live_nodes(&self, infra: &Infra) -> Result<Vec<NodeId>> {
        Ok(self.live_members(infra).await?.into_iter().map(|(n, _)| n).collect())
    }

    /// Keeps the record of membership leases current while the node runs (a KV watch of
    /// `_node.*`), so that a node that stops renewing is judged gone `stale` after its last
    /// renewal, not `stale` after someone first looks.
    pub async fn watch_members(self, infra: Infra, cancel: CancellationToken, retry: Duration) {
        loop {
            match infra.jobs.watch(subjects::NODE_LEASES).await {
                Ok(mut w) => loop {
                    let next = tokio::select! {
                        _ = cancel.cancelled() => return,
                        n = w.next() => n,
                    };
                    match next {
                        Some(Ok(e)) => {
                            self.observe(&e.key, e.revision);
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "membership watch error; watching again");
                            break;
                        }
                        None => break,
                    }
                },
                Err(e) => tracing::debug!(error = %e, "membership watch failed; retrying"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Holders
// ---------------------------------------------------------------------------------------------

/// Whether this process has held a lease without a gap anyone could have seen (module docs).
#[derive(Debug, Clone)]
pub struct Continuity {
    inner: Arc<Mutex<ContinuityState>>,
    window: Duration,
}

#[derive(Debug)]
struct ContinuityState {
    /// When the last acknowledged write of the lease was sent.
    last_sent: Instant,
    broken: bool,
}

impl Continuity {
    /// Continuity from a lease write sent at `sent` and acknowledged.
    pub fn new(sent: Instant, stale: Duration) -> Continuity {
        Continuity {
            inner: Arc::new(Mutex::new(ContinuityState { last_sent: sent, broken: false })),
            window: fence_window(stale),
        }
    }

    /// Whether this process may act on the lease now: continuity was never broken and its last
    /// acknowledged renewal was sent within the fence window.
    pub fn holds(&self) -> bool {
        self.holds_at(Instant::now())
    }

    fn holds_at(&self, now: Instant) -> bool {
        let s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        !s.broken && now.duration_since(s.last_sent) < self.window
    }

    /// Whether continuity was broken for good.
    pub fn broken(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).broken
    }

    /// Records a renewal sent at `sent` and acknowledged at `acked`; returns the gap (from the
    /// previous acknowledged renewal's sending to this acknowledgement) when it broke continuity.
    pub fn renewed(&self, sent: Instant, acked: Instant) -> Option<Duration> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let gap = acked.duration_since(s.last_sent);
        s.last_sent = sent;
        if gap >= self.window {
            s.broken = true;
            return Some(gap);
        }
        None
    }

    /// Marks continuity broken (the lease was lost).
    pub fn break_now(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).broken = true;
    }
}

/// A lease this process holds.
#[derive(Debug, Clone)]
pub struct Held {
    /// KV key.
    pub key: String,
    /// The value written.
    pub lease: Lease,
    /// Its KV revision.
    pub revision: u64,
    /// Whether it has been held without a gap.
    pub continuity: Continuity,
}

/// What [`try_acquire`] found.
#[derive(Debug)]
pub enum Attempt {
    /// Taken (or renewed).
    Acquired(Held),
    /// Another process holds it and renews it.
    HeldBy(Lease),
}

/// Takes `key` for (`node`, `instance`) if it is free, or its holder is gone by `liveness`.
///
/// # Errors
/// NATS errors; an undecodable lease value.
pub async fn try_acquire(
    infra: &Infra,
    liveness: &Liveness,
    key: &str,
    node: &NodeId,
    instance: InstanceId,
    timings: &Timings,
) -> Result<Attempt> {
    let lease = Lease { node: node.clone(), instance, renewed_ms: now_ms() };
    let value = Bytes::from(shoal_proto::encode(&lease));
    let sent = Instant::now();
    let written = match Liveness::read(infra, key).await? {
        Some(r) => {
            if r.lease.instance != instance && liveness.observe(key, r.revision) {
                return Ok(Attempt::HeldBy(r.lease));
            }
            infra.jobs.update(key, value, r.revision).await.ok()
        }
        None => match infra.jobs.entry(key).await.map_err(|e| Error::nats("read lease", e))? {
            // A deleted lease: write over the delete marker. A value written since the read
            // (another process created the lease in between) is a race lost, never overwritten.
            Some(e) if e.operation != async_nats::jetstream::kv::Operation::Put => {
                infra.jobs.update(key, value, e.revision).await.ok()
            }
            Some(_) => None,
            None => infra.jobs.create(key, value).await.ok(),
        },
    };
    match written {
        Some(revision) => Ok(Attempt::Acquired(Held {
            key: key.to_owned(),
            lease,
            revision,
            continuity: Continuity::new(sent, timings.lease_stale()),
        })),
        // Raced with another writer: report whoever holds it now.
        None => match Liveness::read(infra, key).await? {
            Some(r) => Ok(Attempt::HeldBy(r.lease)),
            None => Ok(Attempt::HeldBy(lease)),
        },
    }
}

/// Renews `held`. `Ok(false)`: the lease was taken over (this process must stop acting on it).
///
/// # Errors
/// NATS errors other than a lost compare-and-set (the caller retries at the next tick).
pub async fn renew(infra: &Infra, held: &mut Held) -> Result<bool> {
    held.lease.renewed_ms = now_ms();
    let value = Bytes::from(shoal_proto::encode(&held.lease));
    match infra.jobs.update(&held.key, value, held.revision).await {
        Ok(rev) => {
            held.revision = rev;
            Ok(true)
        }
        Err(e) if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
            // A renewal that timed out (e.g. during a NATS outage) may still have been applied,
            // moving the revision on: if the stored lease is still this process's, adopt its
            // revision and go on; only another holder means the lease is lost.
            let ours = Liveness::read(infra, &held.key).await?.and_then(|r| {
                (r.lease.node == held.lease.node && r.lease.instance == held.lease.instance)
                    .then_some(r.revision)
            });
            match ours {
                Some(revision) => {
                    held.revision = revision;
                    Ok(true)
                }
                None => Ok(false),
            }
        }
        Err(e) => Err(Error::nats("renew lease", e)),
    }
}

/// Why [`keep`] stopped holding a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Asked to stop; the lease was released.
    Released,
    /// Another process holds it now.
    Lost,
    /// A renewal came after a gap longer than the fence window: another process may have
    /// judged this one gone and acted (the lease was released so that it need not wait).
    Fenced(Duration),
}

/// Renews `held` until `stop` is cancelled (then releases it, so a successor need not wait), the
/// lease is lost, or continuity breaks (then releases it too); cancels `lost` in the last two
/// cases.
pub async fn keep(
    infra: Infra,
    mut held: Held,
    timings: Timings,
    stop: CancellationToken,
    lost: CancellationToken,
) -> LeaseEnd {
    let end = loop {
        tokio::select! {
            _ = stop.cancelled() => break LeaseEnd::Released,
            _ = tokio::time::sleep(timings.lease_renew()) => {}
        }
        let sent = Instant::now();
        match renew(&infra, &mut held).await {
            Ok(true) => {
                if let Some(gap) = held.continuity.renewed(sent, Instant::now()) {
                    tracing::error!(
                        key = %held.key, gap_ms = gap.as_millis() as u64,
                        window_ms = fence_window(timings.lease_stale()).as_millis() as u64,
                        "lease renewal gap longer than the fence window (a pause or a partition): \
                         another process may have taken over; fencing"
                    );
                    break LeaseEnd::Fenced(gap);
                }
            }
            Ok(false) => {
                tracing::error!(key = %held.key, "lease taken over by another process");
                held.continuity.break_now();
                lost.cancel();
                return LeaseEnd::Lost;
            }
            Err(e) => tracing::warn!(key = %held.key, error = %e, "renewing a lease failed; retrying"),
        }
    };
    held.continuity.break_now();
    let _ = infra.jobs.delete_expect_revision(&held.key, Some(held.revision)).await;
    if end != LeaseEnd::Released {
        lost.cancel();
    }
    end
}

/// Takes this node's membership lease. A restarted node (same id) waits for its predecessor's
/// lease to lapse; a live process with the same node id is refused.
///
/// # Errors
/// [`Error::NodeBusy`] when another live process uses `node`; NATS errors.
pub async fn join(infra: &Infra, liveness: &Liveness, node: &NodeId, timings: &Timings) -> Result<Held> {
    let instance = InstanceId(rand::random::<u64>());
    let key = subjects::node_lease_key(node);
    let deadline = tokio::time::Instant::now() + timings.lease_stale() * 3;
    let mut told = false;
    loop {
        match try_acquire(infra, liveness, &key, node, instance, timings).await? {
            Attempt::Acquired(h) => return Ok(h),
            Attempt::HeldBy(_) if tokio::time::Instant::now() > deadline => {
                return Err(Error::NodeBusy(node.clone()));
            }
            Attempt::HeldBy(held) => {
                if !told {
                    // Once: a restarted node's predecessor stops renewing, and its lease goes
                    // stale `lease_stale` after its last renewal.
                    let age = now_ms().saturating_sub(held.renewed_ms);
                    let left = (timings.lease_stale_ms).saturating_sub(age);
                    tracing::info!(
                        %node,
                        "waiting up to {left} ms for the previous process of this node to go away (its lease \
                         was renewed {age} ms ago)"
                    );
                    told = true;
                }
                tokio::time::sleep(ms(timings.nak_lagging_ms)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_observer_declares_a_holder_gone_only_after_seeing_one_revision_for_the_stale_time() {
        let stale = Duration::from_secs(3);
        let l = Liveness::new(stale);
        let t0 = Instant::now();
        assert!(l.observe_at("_node.a", 5, t0), "first sight counts as fresh");
        assert!(l.observe_at("_node.a", 5, t0 + Duration::from_millis(2999)));
        assert!(!l.observe_at("_node.a", 5, t0 + stale), "same revision for the stale time: gone");
        assert!(l.observe_at("_node.a", 6, t0 + stale), "a renewal revives it");
        assert!(l.observe_at("_node.a", 5, t0 + stale * 2), "an older read does not reset the clock");
        assert!(!l.observe_at("_node.a", 6, t0 + stale * 2));
    }

    #[test]
    fn a_holder_acts_only_within_the_window_and_a_long_gap_breaks_continuity() {
        let stale = Duration::from_secs(3);
        let t0 = Instant::now();
        let c = Continuity::new(t0, stale);
        assert_eq!(fence_window(stale), Duration::from_secs(2));
        assert!(c.holds_at(t0 + Duration::from_millis(1999)));
        assert!(!c.holds_at(t0 + Duration::from_secs(2)), "no acknowledged renewal within the window");
        // A renewal sent at 1 s, acknowledged at 1.2 s: continuous; the window moves on.
        assert_eq!(c.renewed(t0 + Duration::from_secs(1), t0 + Duration::from_millis(1200)), None);
        assert!(c.holds_at(t0 + Duration::from_millis(2999)));
        // The next one acknowledged 2.5 s after the previous was sent (a pause): broken for good.
        let gap = c.renewed(t0 + Duration::from_millis(3400), t0 + Duration::from_millis(3500));
        assert_eq!(gap, Some(Duration::from_millis(2500)));
        assert!(!c.holds_at(t0 + Duration::from_millis(3600)));
        assert!(c.broken());
    }
}
