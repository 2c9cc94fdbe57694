//! Adoption of a dead node's updates, so that failover does not wait for JetStream's ack wait.
//!
//! When a node dies holding staged updates, JetStream delivers them again only after their ack
//! wait (30 s by default). Their claims (`shoal-claims`, [`super::claims`]) say which message
//! each one is and which process held it. When the job's top takes over an open round, or finds
//! a node gone during a collection, it asks its own node's gateway to *adopt* the round's
//! updates whose claim names a process that is gone: the gateway reads each message from the
//! stream by sequence, takes the claim over by compare-and-set (exactly as for a redelivery) and
//! stages it. The adopted message has no delivery: the commit's ack deletes it from the work
//! queue ([`super::reject::AckHandle::adopted`]); a redelivery of it that arrives meanwhile finds
//! the claim held by a live process and is left alone.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use shoal_proto::cluster::ClaimValue;
use shoal_proto::{subjects, JobId, RoundId};
use tokio::sync::{mpsc, oneshot};

use super::reject::AckHandle;

/// A request to the gateway to adopt the orphaned updates of one round.
#[derive(Debug)]
pub struct Adopt {
    /// Job.
    pub job: JobId,
    /// Round (the claims' round).
    pub round: RoundId,
    /// Answered with the number of updates adopted.
    pub done: oneshot::Sender<usize>,
}

/// The channel from the tops of a node to its gateway.
#[derive(Debug, Clone)]
pub struct Adoptions {
    tx: mpsc::UnboundedSender<Adopt>,
    rx: Arc<Mutex<Option<mpsc::UnboundedReceiver<Adopt>>>>,
}

impl Default for Adoptions {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Adoptions { tx, rx: Arc::new(Mutex::new(Some(rx))) }
    }
}

impl Adoptions {
    /// Asks this node's gateway to adopt `round` of `job`; returns how many updates it adopted
    /// (0 when the gateway is gone).
    pub async fn adopt(&self, job: &JobId, round: RoundId) -> usize {
        let (done, answer) = oneshot::channel();
        if self.tx.send(Adopt { job: job.clone(), round, done }).is_err() {
            return 0;
        }
        answer.await.unwrap_or(0)
    }

    /// The receiving end, for the gateway (once).
    pub(super) fn take_receiver(&self) -> Option<mpsc::UnboundedReceiver<Adopt>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The next request, or never when there is no receiver.
pub(super) async fn next(rx: &mut Option<mpsc::UnboundedReceiver<Adopt>>) -> Option<Adopt> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl super::Gateway {
    /// Adopts the updates of `round` of `job` whose claims name a process that is gone (module
    /// docs); returns how many it staged or otherwise settled.
    pub(super) async fn adopt(&mut self, job: &JobId, round: RoundId) -> usize {
        let Some(kv) = self.claims_store().await else { return 0 };
        let bucket = self.ctx.infra.subjects.claims_bucket();
        let filter = format!("$KV.{bucket}.{}", subjects::round_claims(job, round));
        let mut keys = Vec::new();
        match kv.stream.info_with_subjects(&filter).await {
            Ok(mut list) => {
                while let Some(Ok((subject, _))) = list.next().await {
                    if let Some(key) = subject.strip_prefix(&format!("$KV.{bucket}.")) {
                        keys.push(key.to_owned());
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%job, %round, error = %e, "listing the round's claims failed; nothing adopted");
                return 0;
            }
        }
        let mut adopted = 0;
        // Whether each (node, instance) named by a claim is alive, read once per call.
        let mut alive = std::collections::HashMap::new();
        for key in keys {
            let Ok(Some(value)) = kv.get(&key).await else { continue };
            let Ok(claim) = shoal_proto::decode::<ClaimValue>("claim", &value) else { continue };
            if claim.node == self.ctx.node && claim.instance == self.ctx.instance {
                continue;
            }
            let who = (claim.node.clone(), claim.instance);
            let is_alive = match alive.get(&who) {
                Some(&a) => a,
                None => {
                    // An unreadable lease counts as alive: adopt nothing on a guess.
                    let a =
                        self.ctx.liveness.member_alive(&self.ctx.infra, &claim.node, claim.instance).await;
                    let a = a.unwrap_or(true);
                    alive.insert(who, a);
                    a
                }
            };
            if is_alive {
                continue;
            }
            // Acked (and deleted) since, or never stored: nothing to adopt.
            let Ok(m) = self.ctx.infra.updates.get_raw_message(claim.stream_seq).await else { continue };
            let stream = self.ctx.infra.js.get_stream_no_info(self.ctx.infra.subjects.updates_stream()).await;
            let Ok(stream) = stream else { continue };
            let ack = AckHandle::adopted(self.ctx.infra.client.clone(), stream, claim.stream_seq);
            tracing::info!(%job, %round, key, from = %claim.node, seq = claim.stream_seq, "adopting an update of a node that is gone");
            self.ctx.metrics.updates_adopted.inc();
            self.process(m.subject.as_str(), Some(&m.headers), m.payload, claim.stream_seq, ack).await;
            adopted += 1;
        }
        self.flush().await;
        adopted
    }
}
