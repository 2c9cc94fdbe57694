//! The gateway's ledger of the updates it staged and has not settled: each one's JetStream
//! message (acked only after its round commits), its shared-memory slot (returned when the
//! function host releases it), and its object in `shoal-updates` (deleted when it is acked).
//!
//! The function host never touches a message or a slot lease: it sends [`Feedback`] — the slot
//! is released (folded, or no longer needed), the update is settled (ack, hand back, refuse) —
//! through a [`Link`]. Meanwhile the ledger keeps every held message alive with in-progress acks
//! (`ack wait / 3`), so one task does for all what every aggregator used to do for its own. At
//! shutdown every update still held goes back to JetStream at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{ClientId, JobId, RoundId};
use tokio::sync::{mpsc, oneshot};

use super::reject::{AckHandle, Refusal, Refused, Rejector};
use crate::nats::Infra;
use crate::staging::Slot;

/// An update the gateway staged and holds until it is settled.
#[derive(Debug)]
pub struct HeldUpdate {
    /// Job.
    pub job: JobId,
    /// The round it was staged for (named in a refusal).
    pub round: RoundId,
    /// Sender.
    pub client: ClientId,
    /// Its message's stream sequence (the ledger's key).
    pub stream_seq: u64,
    /// Acks, naks or terminates its message.
    pub ack: AckHandle,
    /// Its slot lease, until the function host releases it (`None`: shared with the host as a
    /// view; the slot returns when the view is dropped too).
    pub slot: Option<Slot>,
    /// Its object in `shoal-updates`, deleted when it is acked.
    pub object: Option<String>,
}

/// How an update ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Its round committed with it: ack it (and delete its object).
    Ack,
    /// Hand it back to JetStream, redelivered after the delay (an asynchronous update that
    /// missed its buffer; updates released at shutdown).
    Nak(Duration),
    /// Refuse it (the client is told why; the message is terminated).
    Reject(Refusal),
}

/// What the function host tells the gateway about an update, by its stream sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    /// The host is done with the update's bytes.
    Release {
        /// The update.
        stream_seq: u64,
    },
    /// The update is settled (its slot too).
    Settle {
        /// The update.
        stream_seq: u64,
        /// How.
        settle: Settle,
    },
}

#[derive(Debug)]
enum Cmd {
    Hold(Box<HeldUpdate>),
    Feedback(Feedback),
    Shutdown(oneshot::Sender<usize>),
}

/// Where the function host sends its [`Feedback`] (cheap to clone).
#[derive(Debug, Clone)]
pub struct Link {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Link {
    /// The host is done with the update's bytes.
    pub fn release(&self, stream_seq: u64) {
        let _ = self.tx.send(Cmd::Feedback(Feedback::Release { stream_seq }));
    }

    /// The update is settled.
    pub fn settle(&self, stream_seq: u64, settle: Settle) {
        let _ = self.tx.send(Cmd::Feedback(Feedback::Settle { stream_seq, settle }));
    }

    /// Sends a feedback record as received from a function host.
    pub fn feedback(&self, f: Feedback) {
        let _ = self.tx.send(Cmd::Feedback(f));
    }
}

/// The gateway's handle on its ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<Cmd>,
}

/// What the ledger needs to settle updates.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// In-progress acks go out this often (a third of the ack wait).
    pub progress_interval: Duration,
    /// Nak delay of updates still held at shutdown.
    pub release_delay: Duration,
}

impl Ledger {
    /// Starts the ledger's task.
    pub fn spawn(infra: Infra, rejector: Rejector, config: LedgerConfig) -> Ledger {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, infra, rejector, config));
        Ledger { tx }
    }

    /// Records a staged update (before its descriptor goes to the host, so the host's feedback
    /// always finds it).
    pub fn hold(&self, update: HeldUpdate) {
        let _ = self.tx.send(Cmd::Hold(Box::new(update)));
    }

    /// The link a function host sends its feedback through.
    pub fn link(&self) -> Link {
        Link { tx: self.tx.clone() }
    }

    /// Hands every update still held back to JetStream and stops; returns how many.
    pub async fn shutdown(&self) -> usize {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Cmd::Shutdown(done)).is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Cmd>, infra: Infra, rejector: Rejector, config: LedgerConfig) {
    let mut held: HashMap<u64, HeldUpdate> = HashMap::new();
    let mut keepalive = tokio::time::interval(config.progress_interval);
    keepalive.tick().await;
    let objects = Arc::new(infra.update_objects.clone());
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { return };
                let mut settled = false;
                let mut next = Some(cmd);
                // Everything queued now, then one flush for the acks it sent.
                while let Some(cmd) = next.take() {
                    match cmd {
                        Cmd::Hold(u) => {
                            held.insert(u.stream_seq, *u);
                        }
                        Cmd::Feedback(f) => settled |= apply(&mut held, f, &objects, &rejector).await,
                        Cmd::Shutdown(done) => {
                            let n = release_all(&mut held, config.release_delay).await;
                            let _ = infra.client.flush().await;
                            let _ = done.send(n);
                            return;
                        }
                    }
                    next = rx.try_recv().ok();
                }
                if settled {
                    if let Err(e) = infra.client.flush().await {
                        tracing::warn!(error = %e, "flushing acks failed; JetStream may redeliver (acked copies are recognised)");
                    }
                }
            }
            _ = keepalive.tick() => {
                // Keep every held message from being redelivered while its round is open.
                for u in held.values() {
                    u.ack.progress().await;
                }
            }
        }
    }
}

/// Applies one feedback record; `true` when an update was settled.
async fn apply(
    held: &mut HashMap<u64, HeldUpdate>,
    f: Feedback,
    objects: &async_nats::jetstream::object_store::ObjectStore,
    rejector: &Rejector,
) -> bool {
    match f {
        Feedback::Release { stream_seq } => {
            if let Some(u) = held.get_mut(&stream_seq) {
                u.slot = None;
            }
            false
        }
        Feedback::Settle { stream_seq, settle } => {
            let Some(u) = held.remove(&stream_seq) else {
                tracing::debug!(stream_seq, "settling an update the ledger does not hold (settled already)");
                return false;
            };
            match settle {
                Settle::Ack => {
                    u.ack.ack().await;
                    if let Some(obj) = &u.object {
                        if let Err(e) = objects.delete(obj).await {
                            tracing::debug!(object = %obj, error = %e, "deleting a consumed update object failed");
                        }
                    }
                }
                Settle::Nak(delay) => {
                    u.ack.nak(delay).await;
                }
                Settle::Reject(refusal) => {
                    let who =
                        Refused { job: Some(u.job.as_str()), client: Some(&u.client), round: Some(u.round) };
                    rejector.reject(who, refusal, Some(&u.ack)).await;
                }
            }
            true
        }
    }
}

/// Hands every held update back to JetStream (shutdown): a short delay, because an immediate
/// redelivery could go to this node's own pull request, still registered at the server until the
/// connection closes.
async fn release_all(held: &mut HashMap<u64, HeldUpdate>, delay: Duration) -> usize {
    let n = held.len();
    for (_, u) in held.drain() {
        u.ack.nak(delay).await;
    }
    n
}
