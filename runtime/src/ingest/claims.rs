//! Cluster-wide claims on staged updates, in KV `shoal-claims`: one node stages each
//! (job, round, client).
//!
//! Why: JetStream delivers a message to one pull request at a time, but not exactly once. A
//! message is delivered again while the first node still holds it when its ack wait lapses
//! (a node too slow to send its in-progress acks), or when nats-server restarts and the
//! consumer's delivery state was not yet on disk. A per-node check cannot see the copy on
//! another node, and both leaves would fold it into the round: applied twice. So before a
//! gateway hands a staged update on, it claims `<job>.<round>.<client>` with a KV create
//! naming its stream sequence and the node process (membership lease instance):
//! - created, or already ours: stage it;
//! - held by another live process for the same message: leave it alone (that process acks it
//!   after the commit; if it dies, JetStream delivers it again and the claim is taken over);
//! - held by a process that is gone (its membership lease lapsed, or was taken by a restarted
//!   process): take the claim over by compare-and-set and stage it;
//! - a *different* message of the same client and round: a second update, refused as
//!   `duplicate`.
//!
//! Claims expire with the bucket's max age ([`MAX_AGE`]); nothing deletes them.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use shoal_proto::{ClientId, InstanceId, JobId, NodeId, RoundId};

use crate::cluster::lease::Liveness;
use crate::error::{Error, Result};
use crate::nats::Infra;
use shoal_proto::subjects;

/// How long a claim is kept (longer than any round).
pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);

pub use shoal_proto::cluster::ClaimValue;

/// What [`claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This process stages the update.
    Mine,
    /// Another live process holds this very message.
    HeldBy(NodeId),
    /// The client's round is claimed by another message (stream sequence).
    Other(u64),
}

/// Who claims: a node process, and how it judges other processes' membership leases.
#[derive(Debug, Clone, Copy)]
pub struct Claimant<'a> {
    /// The node.
    pub node: &'a NodeId,
    /// Its process (membership lease instance).
    pub instance: InstanceId,
    /// Its observations of membership leases.
    pub liveness: &'a Liveness,
}

/// Claims (job, round, client) for message `stream_seq` on behalf of `claimant`.
///
/// # Errors
/// NATS errors (the caller hands the message back to JetStream and tries again later).
pub async fn claim(
    claims: &kv::Store,
    infra: &Infra,
    (job, round, client): (&JobId, RoundId, &ClientId),
    claimant: Claimant<'_>,
    stream_seq: u64,
) -> Result<Claim> {
    let Claimant { node, instance, liveness } = claimant;
    let key = subjects::claim_key(job, round, client);
    let mine = ClaimValue { node: node.clone(), instance, stream_seq };
    let value = Bytes::from(shoal_proto::encode(&mine));
    for _ in 0..3 {
        match claims.create(&key, value.clone()).await {
            Ok(_) => return Ok(Claim::Mine),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::nats("claim an update", e)),
        }
        let Some(entry) = claims.entry(&key).await.map_err(|e| Error::nats("read a claim", e))? else {
            continue; // expired meanwhile: create again
        };
        let held: ClaimValue = match shoal_proto::decode("claim", &entry.value) {
            Ok(v) if entry.operation == kv::Operation::Put => v,
            // Undecodable or deleted: take it over.
            _ => ClaimValue { node: node.clone(), instance: InstanceId(0), stream_seq },
        };
        if held.stream_seq != stream_seq {
            return Ok(Claim::Other(held.stream_seq));
        }
        if held.instance == instance && held.node == *node {
            return Ok(Claim::Mine);
        }
        if held.instance != InstanceId(0) && liveness.member_alive(infra, &held.node, held.instance).await? {
            return Ok(Claim::HeldBy(held.node));
        }
        match claims.update(&key, value.clone(), entry.revision).await {
            Ok(_) => return Ok(Claim::Mine),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => return Err(Error::nats("take over a claim", e)),
        }
    }
    Err(Error::Nats {
        op: "claim an update",
        source: Box::new(std::io::Error::other(format!("claim {key} keeps changing"))),
    })
}

/// Gives up the claim on (job, round, client) if it still names message `stream_seq`: the
/// update was refused after it was claimed (fold-while-staging claims before reading), so the
/// client may send another. Best effort (a claim left behind only makes a retry `duplicate`
/// until it expires).
///
/// # Errors
/// NATS errors.
pub async fn release(
    claims: &kv::Store,
    (job, round, client): (&JobId, RoundId, &ClientId),
    stream_seq: u64,
) -> Result<()> {
    let key = subjects::claim_key(job, round, client);
    let Some(entry) = claims.entry(&key).await.map_err(|e| Error::nats("read a claim", e))? else {
        return Ok(());
    };
    let held: Option<ClaimValue> = shoal_proto::decode("claim", &entry.value).ok();
    if entry.operation != kv::Operation::Put || held.is_none_or(|h| h.stream_seq != stream_seq) {
        return Ok(());
    }
    claims
        .delete_expect_revision(&key, Some(entry.revision))
        .await
        .map_err(|e| Error::nats("release a claim", e))
}
