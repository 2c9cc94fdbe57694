//! Leases in KV `shoal-jobs`: a node's membership (`_node.<id>`, which also keeps two processes
//! from using one node id) and a job's top (`<job>.top`, DESIGN.md §7: one top per job, a dead
//! top replaced when its lease lapses).
//!
//! A lease is a value `{node, instance, renewed_ms}` written by compare-and-set on its KV
//! revision, renewed every `timings.lease_renew_ms` and stale after `timings.lease_stale_ms`
//! (`shoal_proto::config::Timings`). Clocks only matter to tell "stale": nodes of one cluster
//! must agree on time to within a fraction of the stale time.

use bytes::Bytes;
use futures::StreamExt;
use shoal_proto::config::{ms, Timings};
use shoal_proto::{InstanceId, NodeId};
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::nats::Infra;
use shoal_proto::subjects;

pub use shoal_proto::cluster::Lease;

/// A lease this process holds.
#[derive(Debug, Clone)]
pub struct Held {
    /// KV key.
    pub key: String,
    /// The value written.
    pub lease: Lease,
    /// Its KV revision.
    pub revision: u64,
}

/// What [`try_acquire`] found.
#[derive(Debug)]
pub enum Attempt {
    /// Taken (or renewed).
    Acquired(Held),
    /// Another process holds it and renews it.
    HeldBy(Lease),
}

/// Takes `key` for (`node`, `instance`) if it is free or stale.
///
/// # Errors
/// NATS errors; an undecodable lease value.
pub async fn try_acquire(
    infra: &Infra,
    key: &str,
    node: &NodeId,
    instance: InstanceId,
    timings: &Timings,
) -> Result<Attempt> {
    let now = now_ms();
    let lease = Lease { node: node.clone(), instance, renewed_ms: now };
    let value = Bytes::from(shoal_proto::encode(&lease));
    let entry = infra.jobs.entry(key).await.map_err(|e| Error::nats("read lease", e))?;
    let written = match entry {
        Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => {
            let held: Lease = shoal_proto::decode("lease", &e.value)?;
            if held.fresh(now, timings.lease_stale()) && held.instance != instance {
                return Ok(Attempt::HeldBy(held));
            }
            infra.jobs.update(key, value, e.revision).await.ok()
        }
        Some(e) => infra.jobs.update(key, value, e.revision).await.ok(),
        None => infra.jobs.create(key, value).await.ok(),
    };
    match written {
        Some(revision) => Ok(Attempt::Acquired(Held { key: key.to_owned(), lease, revision })),
        // Raced with another writer: report whoever holds it now.
        None => match infra.jobs.get(key).await.map_err(|e| Error::nats("read lease", e))? {
            Some(v) => Ok(Attempt::HeldBy(shoal_proto::decode("lease", &v)?)),
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
            let entry = infra.jobs.entry(&held.key).await.map_err(|e| Error::nats("read lease", e))?;
            let ours =
                entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put).and_then(|e| {
                    let l: Lease = shoal_proto::decode("lease", &e.value).ok()?;
                    (l.node == held.lease.node && l.instance == held.lease.instance).then_some(e.revision)
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

/// Renews `held` until `stop` is cancelled (then releases it, so a successor need not wait) or
/// the lease is lost (then cancels `lost`).
pub async fn keep(
    infra: Infra,
    mut held: Held,
    timings: Timings,
    stop: CancellationToken,
    lost: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = infra.jobs.delete_expect_revision(&held.key, Some(held.revision)).await;
                return;
            }
            _ = tokio::time::sleep(timings.lease_renew()) => {}
        }
        match renew(&infra, &mut held).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(key = %held.key, "lease taken over by another process");
                lost.cancel();
                return;
            }
            Err(e) => tracing::warn!(key = %held.key, error = %e, "renewing a lease failed; retrying"),
        }
    }
}

/// Takes this node's membership lease. A restarted node (same id) waits for its predecessor's
/// lease to lapse; a live process with the same node id is refused.
///
/// # Errors
/// [`Error::NodeBusy`] when another live process uses `node`; NATS errors.
pub async fn join(infra: &Infra, node: &NodeId, timings: &Timings) -> Result<Held> {
    let instance = InstanceId(rand::random::<u64>());
    let key = subjects::node_lease_key(node);
    let deadline = tokio::time::Instant::now() + timings.lease_stale() * 3;
    let mut told = false;
    loop {
        match try_acquire(infra, &key, node, instance, timings).await? {
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

/// The holder of the lease `key` if it is fresh (renewed within the stale time); `None` when nobody
/// holds it or the holder stopped renewing.
///
/// # Errors
/// NATS and decode errors.
pub async fn fresh_holder(infra: &Infra, key: &str, timings: &Timings) -> Result<Option<NodeId>> {
    let Some(v) = infra.jobs.get(key).await.map_err(|e| Error::nats("read lease", e))? else {
        return Ok(None);
    };
    let lease: Lease = shoal_proto::decode("lease", &v)?;
    Ok(lease.fresh(now_ms(), timings.lease_stale()).then_some(lease.node))
}

/// The nodes whose membership lease is fresh, sorted by id.
///
/// # Errors
/// NATS errors listing the bucket.
pub async fn live_nodes(infra: &Infra, timings: &Timings) -> Result<Vec<NodeId>> {
    let mut keys = infra.jobs.keys().await.map_err(|e| Error::nats("list node leases", e))?;
    let now = now_ms();
    let mut nodes = Vec::new();
    while let Some(k) = keys.next().await {
        let Ok(k) = k else { continue };
        if !k.starts_with("_node.") {
            continue;
        }
        let Ok(Some(v)) = infra.jobs.get(&k).await else { continue };
        if let Ok(l) = shoal_proto::decode::<Lease>("lease", &v) {
            if l.fresh(now, timings.lease_stale()) {
                nodes.push(l.node);
            }
        }
    }
    nodes.sort();
    nodes.dedup();
    Ok(nodes)
}
