//! Refusing an update: count it (bounded label), log it once per cause, tell the client on
//! `<prefix>.<job>.rejected.<client>`, and terminate the JetStream message so it is never
//! redelivered. Used by the gateway and the function host alike.

use std::sync::Arc;

use async_nats::jetstream::AckKind;
use async_nats::Subject;
use bytes::Bytes;
use shoal_functions::{ClientId, RoundId};

use crate::error::RejectReason;
use crate::metrics::Metrics;
use shoal_proto::subjects::Subjects;
use shoal_proto::RejectNotice;

/// Shared rejection path.
#[derive(Clone, Debug)]
pub struct Rejector {
    client: async_nats::Client,
    subjects: Subjects,
    metrics: Arc<Metrics>,
}

impl Rejector {
    /// A rejector publishing with `client`.
    pub fn new(client: async_nats::Client, subjects: Subjects, metrics: Arc<Metrics>) -> Rejector {
        Rejector { client, subjects, metrics }
    }

    /// Rejects one update. `job`/`client` are as parsed from the subject (`None` if unparsable).
    pub async fn reject(
        &self,
        job: Option<&str>,
        client: Option<&ClientId>,
        round: Option<RoundId>,
        reason: RejectReason,
        detail: String,
        acker: Option<&AckHandle>,
    ) {
        if let Some(n) = self.metrics.reject(reason) {
            tracing::warn!(
                reason = reason.as_str(),
                job = job.unwrap_or("?"),
                client = client.map(|c| c.as_str()).unwrap_or("?"),
                round = round.map(|r| r.0),
                occurrences = n,
                "update rejected: {detail}"
            );
        }
        // The notice goes out before the message is terminated: a process killed between the
        // two leaves the message to be delivered and refused again (a second notice), not a
        // refusal the client never hears of.
        if let (Some(job), Some(client)) = (job.and_then(|j| shoal_functions::JobId::new(j).ok()), client) {
            let notice = RejectNotice { job: job.to_string(), client: client.clone(), round, reason, detail };
            let subject = self.subjects.rejected(&job, client);
            if let Err(e) = self.client.publish(subject, Bytes::from(shoal_proto::encode(&notice))).await {
                tracing::debug!(error = %e, "publishing a reject notice failed");
            }
        }
        if let Some(a) = acker {
            a.term().await;
        }
    }
}

/// Acknowledges one JetStream message later, by publishing to its reply subject (the JetStream
/// ack protocol). Small and cloneable, so the message payload can be dropped as soon as it is
/// staged while its ack waits for the round's commit.
#[derive(Clone, Debug)]
pub struct AckHandle {
    client: async_nats::Client,
    reply: Subject,
}

impl AckHandle {
    /// A handle for the message whose reply subject is `reply`.
    pub fn new(client: async_nats::Client, reply: Subject) -> AckHandle {
        AckHandle { client, reply }
    }

    async fn send(&self, kind: AckKind) -> bool {
        match self.client.publish(self.reply.clone(), Bytes::from(kind)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "ack publish failed; JetStream will redeliver");
                false
            }
        }
    }

    /// Done: the round using the update is committed.
    pub async fn ack(&self) -> bool {
        self.send(AckKind::Ack).await
    }

    /// Still working: restart the ack-wait timer.
    pub async fn progress(&self) -> bool {
        self.send(AckKind::Progress).await
    }

    /// Never redeliver (rejected).
    pub async fn term(&self) -> bool {
        self.send(AckKind::Term).await
    }

    /// Redeliver after `delay`.
    pub async fn nak(&self, delay: std::time::Duration) -> bool {
        self.send(AckKind::Nak(Some(delay))).await
    }
}
