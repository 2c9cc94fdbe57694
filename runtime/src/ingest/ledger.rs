//! The gateway's ledger of the updates it staged and has not settled: each one's JetStream
//! message (acked only after its round commits), its shared-memory slot (returned when the
//! function host releases it), and its upload's chunks (purged when it is acked or refused).
//!
//! The function host never touches a message or a slot lease: it sends [`Feedback`] — the slot
//! is released (folded, or no longer needed), the update is settled (ack, hand back, refuse) —
//! through a [`Link`]. Meanwhile the ledger keeps every held message alive with in-progress acks
//! (`ack wait / 3`), so one task does for all what every aggregator used to do for its own. At
//! shutdown every update still held goes back to JetStream at once.

use std::collections::HashMap;
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
    /// Its upload's chunks, when its payload came on the upload path (purged when it is settled
    /// for good: acked or refused).
    pub upload: Option<UploadChunks>,
}

/// The chunks of a staged update's upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadChunks {
    /// The round the upload was published for (its `Shoal-Round` header; it differs from the
    /// staged round for a stale update of an asynchronous job).
    pub round: RoundId,
    /// The stream sequence just past the chunks the gateway read: purging below it never
    /// removes a chunk the client sent afterwards.
    pub below_seq: u64,
}

/// How an update ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Its round committed with it: ack it (and purge its upload).
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
    SetUpload(u64, UploadChunks),
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

    /// A link attached to no ledger: what is sent through it comes out of the receiver (how a
    /// function-host process forwards its feedback to the gateway over the descriptor channel).
    pub fn forwarding() -> (Link, FeedbackReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Link { tx }, FeedbackReceiver(rx))
    }
}

/// The receiving end of [`Link::forwarding`].
#[derive(Debug)]
pub struct FeedbackReceiver(mpsc::UnboundedReceiver<Cmd>);

impl FeedbackReceiver {
    /// The next feedback record; `None` once every link is dropped.
    pub async fn recv(&mut self) -> Option<Feedback> {
        loop {
            if let Cmd::Feedback(f) = self.0.recv().await? {
                return Some(f);
            }
        }
    }
}

/// The gateway's handle on its ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<Cmd>,
    handed_back: HandedBack,
}

/// Stream sequences the ledger handed back to JetStream (`Settle::Nak`): the gateway no longer
/// holds them, so their redelivery is staged again, not ignored as a copy of one it holds.
type HandedBack = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<u64>>>;

/// At most this many handed-back sequences are remembered (the redeliveries of the others may
/// have gone to other nodes): past it the set starts again.
const HANDED_BACK_MAX: usize = 1 << 16;

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
        let handed_back = HandedBack::default();
        tokio::spawn(run(rx, infra, rejector, config, handed_back.clone()));
        Ledger { tx, handed_back }
    }

    /// Whether the update at `stream_seq` was handed back to JetStream since it was staged
    /// (forgotten once asked): its redelivery must be staged again.
    pub fn take_handed_back(&self, stream_seq: u64) -> bool {
        self.handed_back.lock().unwrap_or_else(|p| p.into_inner()).remove(&stream_seq)
    }

    /// Records a staged update (before its descriptor goes to the host, so the host's feedback
    /// always finds it).
    pub fn hold(&self, update: HeldUpdate) {
        let _ = self.tx.send(Cmd::Hold(Box::new(update)));
    }

    /// Names the upload chunks of an update held before they were read (fold-while-staging:
    /// the update is held, and handed to the host, before its upload is read).
    pub fn set_upload(&self, stream_seq: u64, chunks: UploadChunks) {
        let _ = self.tx.send(Cmd::SetUpload(stream_seq, chunks));
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

async fn run(
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    infra: Infra,
    rejector: Rejector,
    config: LedgerConfig,
    handed_back: HandedBack,
) {
    let mut held: HashMap<u64, HeldUpdate> = HashMap::new();
    let mut keepalive = tokio::time::interval(config.progress_interval);
    keepalive.tick().await;
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
                        Cmd::SetUpload(seq, chunks) => {
                            if let Some(u) = held.get_mut(&seq) {
                                u.upload = Some(chunks);
                            }
                        }
                        Cmd::Feedback(f) => {
                            if let Feedback::Settle { stream_seq, settle: Settle::Nak(_) } = &f {
                                if held.contains_key(stream_seq) {
                                    let mut h = handed_back.lock().unwrap_or_else(|p| p.into_inner());
                                    if h.len() >= HANDED_BACK_MAX {
                                        h.clear();
                                    }
                                    h.insert(*stream_seq);
                                }
                            }
                            settled |= apply(&mut held, f, &infra, &rejector).await;
                        }
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
async fn apply(held: &mut HashMap<u64, HeldUpdate>, f: Feedback, infra: &Infra, rejector: &Rejector) -> bool {
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
                    purge_upload(infra, &u).await;
                }
                Settle::Nak(delay) => {
                    u.ack.nak(delay).await;
                }
                Settle::Reject(refusal) => {
                    let who =
                        Refused { job: Some(u.job.as_str()), client: Some(&u.client), round: Some(u.round) };
                    rejector.reject(who, refusal, Some(&u.ack)).await;
                    purge_upload(infra, &u).await;
                }
            }
            true
        }
    }
}

/// Purges the chunks of `u`'s upload, if it had one.
async fn purge_upload(infra: &Infra, u: &HeldUpdate) {
    if let Some(up) = u.upload {
        purge_upload_of(infra, (&u.job, &u.client, up.round), Some(up.below_seq)).await;
    }
}

/// Purges the chunks `client` uploaded for `round` of `job` below stream sequence `below` (all
/// of them: `None`). Best effort: they expire.
pub async fn purge_upload_of(infra: &Infra, who: (&JobId, &ClientId, RoundId), below: Option<u64>) {
    match infra.js.get_stream_no_info(infra.subjects.uploads_stream(who.0)).await {
        Ok(stream) => shoal_client::uploads::purge(&stream, &infra.subjects, who, below).await,
        Err(e) => tracing::debug!(error = %e, "the job's upload stream is gone; nothing to purge"),
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
