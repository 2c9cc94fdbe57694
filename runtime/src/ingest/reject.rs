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

/// A refusal: the typed reason the client is sent, and the detail (logged, and in the notice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The reason.
    pub reason: RejectReason,
    /// Why, in words.
    pub detail: String,
}

impl Refusal {
    /// A refusal for `reason`.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Refusal {
        Refusal { reason, detail: detail.into() }
    }
}

/// Which update a refusal is about, as far as it parsed: its job (as sent; may be unknown),
/// its client and its round.
#[derive(Debug, Clone, Copy, Default)]
pub struct Refused<'a> {
    /// The job token of the subject.
    pub job: Option<&'a str>,
    /// The client of the subject.
    pub client: Option<&'a ClientId>,
    /// The round header, if it parsed.
    pub round: Option<RoundId>,
}

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

    /// Rejects one update: counts and logs the refusal, sends the client its notice, and
    /// terminates the message (when `acker` is given).
    pub async fn reject(&self, update: Refused<'_>, refusal: Refusal, acker: Option<&AckHandle>) {
        let Refused { job, client, round } = update;
        let Refusal { reason, detail } = refusal;
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
///
/// An *adopted* message (read from the stream by sequence because the node that held it is
/// gone, see `ingest::adopt`) has no delivery to answer: acking or refusing it deletes it from
/// the work queue; progress and hand-back do nothing (JetStream delivers it again after its ack
/// wait if it is still there).
#[derive(Clone, Debug)]
pub struct AckHandle {
    client: async_nats::Client,
    to: AckTo,
}

#[derive(Clone, Debug)]
enum AckTo {
    Reply(Subject),
    Adopted { stream: Box<async_nats::jetstream::stream::Stream<()>>, seq: u64 },
}

impl AckHandle {
    /// A handle for the message whose reply subject is `reply`.
    pub fn new(client: async_nats::Client, reply: Subject) -> AckHandle {
        AckHandle { client, to: AckTo::Reply(reply) }
    }

    /// A handle for message `seq` of `stream`, adopted without a delivery.
    pub fn adopted(
        client: async_nats::Client,
        stream: async_nats::jetstream::stream::Stream<()>,
        seq: u64,
    ) -> AckHandle {
        AckHandle { client, to: AckTo::Adopted { stream: Box::new(stream), seq } }
    }

    async fn send(&self, kind: AckKind) -> bool {
        match &self.to {
            AckTo::Reply(reply) => match self.client.publish(reply.clone(), Bytes::from(kind)).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "ack publish failed; JetStream will redeliver");
                    false
                }
            },
            AckTo::Adopted { stream, seq } => match kind {
                AckKind::Ack | AckKind::Term => match stream.delete_message(*seq).await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::debug!(seq, error = %e, "deleting an adopted update failed; JetStream will redeliver it");
                        false
                    }
                },
                _ => true,
            },
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
