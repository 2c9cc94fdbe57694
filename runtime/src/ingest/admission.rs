//! Whether a node takes an update, decided from what it knows — a pure function, unit-tested
//! without NATS. The gateway ([`super`]) gathers the facts ([`Facts`]), calls [`decide`], and
//! carries the [`Decision`] out: refuse with a typed reason, hand the message back for later,
//! ack a copy already applied, leave a redelivery alone, or stage the update.
//!
//! The checks run cheapest first, and each refusal names its reason (DESIGN.md §6): the job's
//! phase, whether this node serves the job, the round and base version against the job state
//! (with staleness in the asynchronous modes), `num_examples`, the update kind, a second update
//! of the client for the round, the round's `max_clients_per_round`, and the inline payload's
//! size against the job's `max_update_bytes` and the node's inline limit. What needs the bytes
//! (the object's size and digest, the safetensors payload) and the cluster-wide claim come after
//! admission.

use std::collections::{BTreeMap, HashMap};

use shoal_proto::headers::UpdateHeaders;
use shoal_proto::{ClientId, JobPhase, JobSpec, JobState, NodeId, RejectReason, RoundId, Staleness};

use super::reject::Refusal;

/// Whether this node serves the update's job (`max_jobs`), as the node's job slots say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Service {
    /// It serves the job.
    Served,
    /// The job watch has not decided yet.
    Unknown,
    /// The job waits for a free slot on this node; `top` is the node holding its top lease
    /// (fresh), if any.
    Waiting {
        /// The job's top, when a node serves it.
        top: Option<NodeId>,
    },
}

/// Why an update goes back to JetStream for later (a negative ack with a delay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Later {
    /// This node's view of the job state lags the committer by a moment.
    Lagging,
    /// Another node serves the job (this one waits for a slot).
    Handoff,
    /// A whole-cohort job's updates are staged on its top's node.
    Pinned,
    /// The job watch has not decided whether this node serves the job.
    Undecided,
}

/// What to do with the update.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Refuse it (the client is told why).
    Refuse(Refusal),
    /// Hand it back to JetStream for later.
    Later(Later),
    /// A committed round already includes this very message (delivered again after its node
    /// died before acking): ack it, fold nothing.
    AlreadyApplied(RoundId),
    /// A redelivery of a message this node holds staged: leave it alone.
    Redelivery,
    /// Stage it.
    Stage(Admitted),
}

/// An admitted update: where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The round it is folded into (the open one; in the asynchronous modes an update for an
    /// earlier round goes into the open buffer).
    pub round: RoundId,
    /// Model versions between its base and the current model (0 in synchronous rounds).
    pub staleness: Staleness,
    /// Whether the job runs an asynchronous mode.
    pub asynchronous: bool,
}

/// The client updates this node holds staged, per job and round: the client and its message's
/// stream sequence (looked up by reference: no key is built per update).
pub type Seen = HashMap<shoal_proto::JobId, BTreeMap<RoundId, HashMap<ClientId, u64>>>;

/// What the node knows when an update arrives.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The update's sender (from its subject).
    pub client: &'a ClientId,
    /// Its message's stream sequence.
    pub stream_seq: u64,
    /// Its parsed headers.
    pub headers: &'a UpdateHeaders,
    /// Its inline payload length (0 on the object path).
    pub payload_len: usize,
    /// The job's spec.
    pub spec: &'a JobSpec,
    /// The job's state as this node last saw it.
    pub state: &'a JobState,
    /// Whether the job's updates are staged on its top's node only.
    pub pinned: bool,
    /// The round whose commit (among those this node has seen) applied this message.
    pub applied: Option<RoundId>,
    /// Whether this node serves the job.
    pub service: &'a Service,
    /// This node.
    pub node: &'a NodeId,
    /// The node holding the job's top lease, as this node last saw it.
    pub top: Option<&'a NodeId>,
    /// The server's `max_payload` (the job's inline limit defaults from it for a spec stored
    /// without one).
    pub max_payload: u64,
    /// The updates this node holds staged.
    pub seen: &'a Seen,
    /// The node's `max_jobs` (named in a `node_at_capacity` refusal).
    pub max_jobs: Option<usize>,
}

fn refuse(reason: RejectReason, detail: String) -> Decision {
    Decision::Refuse(Refusal { reason, detail })
}

/// Decides what to do with an update (see the module docs for the order of the checks).
pub fn decide(f: &Facts<'_>) -> Decision {
    if let Some(round) = f.applied {
        return Decision::AlreadyApplied(round);
    }
    let job = &f.spec.job;
    if let Some(id) = &f.headers.msg_id {
        if !shoal_proto::headers::msg_id_is_own(id, job, f.headers.round, f.client) {
            // Another client's id (JetStream would drop that client's own update as a
            // duplicate): reported, never folded.
            return refuse(
                RejectReason::Unauthorized,
                format!("Nats-Msg-Id {id:?} is not <job>.<round>.<client>.<hash> of this client and round"),
            );
        }
    }
    if f.state.phase != JobPhase::Running {
        return refuse(RejectReason::JobNotRunning, format!("job {job} is {}", f.state.phase));
    }
    match f.service {
        Service::Served => {}
        Service::Unknown => return Decision::Later(Later::Undecided),
        Service::Waiting { top: Some(top) } if top != f.node => return Decision::Later(Later::Handoff),
        Service::Waiting { .. } => {
            return refuse(
                RejectReason::NodeAtCapacity,
                format!(
                    "this node serves its maximum of {} jobs and no node serves job {job} yet",
                    f.max_jobs.unwrap_or(0)
                ),
            )
        }
    }
    if f.pinned && f.top != Some(f.node) {
        return Decision::Later(Later::Pinned);
    }
    let admitted = match round_and_staleness(f) {
        Ok(a) => a,
        Err(d) => return d,
    };
    if let Some(d) = check_update(f, admitted) {
        return d;
    }
    Decision::Stage(admitted)
}

/// The round the update goes into and its staleness, or why not.
fn round_and_staleness(f: &Facts<'_>) -> Result<Admitted, Decision> {
    let (h, state) = (f.headers, f.state);
    let (round, base) = (h.round, h.base_version.0);
    let rule = f.spec.round_rule();
    let not_open =
        || refuse(RejectReason::WrongRound, format!("round {round} is not open; round {} is", state.round));
    let staleness = if rule.asynchronous {
        // Asynchronous modes: an update for any round up to the open one is folded into the
        // open buffer, weighted by how many versions behind its base is.
        if round.0 > state.round.0.saturating_add(1) {
            return Err(not_open());
        }
        if round > state.round || !state.is_open() {
            // The next round, or the buffer between two: our view may lag by a moment.
            return Err(Decision::Later(Later::Lagging));
        }
        let current = state.model_version.0;
        if base > current {
            return Err(refuse(
                RejectReason::WrongBaseVersion,
                format!("trained from version {base}, newer than the current {current}"),
            ));
        }
        if current - base > rule.max_staleness {
            return Err(refuse(
                RejectReason::LateUpdate,
                format!(
                    "trained from version {base}, {} versions behind; the job accepts {}",
                    current - base,
                    rule.max_staleness
                ),
            ));
        }
        current - base
    } else {
        0
    };
    if !rule.asynchronous && round < state.round {
        return Err(refuse(
            RejectReason::LateUpdate,
            format!("round {round} closed; round {} is open", state.round),
        ));
    }
    if round.0 == state.round.0 + 1 {
        return Err(Decision::Later(Later::Lagging));
    }
    if round > state.round {
        return Err(not_open());
    }
    if !rule.asynchronous && base != state.model_version.0 {
        return Err(refuse(
            RejectReason::WrongBaseVersion,
            format!("trained from version {base}; round {round} trains from {}", state.model_version),
        ));
    }
    Ok(Admitted { round: state.round, staleness: Staleness(staleness), asynchronous: rule.asynchronous })
}

/// The update's own fields against the job: weight, kind, a second update, the round's
/// capacity, and the inline payload's size.
fn check_update(f: &Facts<'_>, admitted: Admitted) -> Option<Decision> {
    let (h, spec, job) = (f.headers, f.spec, &f.spec.job);
    let round = h.round;
    if h.num_examples == 0 || h.num_examples > spec.max_num_examples {
        return Some(refuse(
            RejectReason::InvalidWeight,
            format!("num_examples {} outside 1..={}", h.num_examples, spec.max_num_examples),
        ));
    }
    if h.kind != spec.update_kind {
        return Some(refuse(
            RejectReason::SchemaMismatch,
            format!("job {job} takes {} updates, got {}", spec.update_kind.as_str(), h.kind.as_str()),
        ));
    }
    let held = f.seen.get(job).and_then(|rounds| rounds.get(&seen_round(admitted, round)));
    match held.and_then(|m| m.get(f.client)) {
        Some(&seq) if seq == f.stream_seq => return Some(Decision::Redelivery),
        Some(_) => {
            return Some(refuse(
                RejectReason::Duplicate,
                format!("client {} already sent an update for round {round}", f.client),
            ))
        }
        None => {}
    }
    if let Some(max) = spec.round_client_limit() {
        let staged = held.map_or(0, HashMap::len);
        if staged >= max as usize {
            return Some(refuse(
                RejectReason::CohortFull,
                format!("round {round} holds {staged} updates, the job's max_clients_per_round"),
            ));
        }
    }
    if h.upload.is_none() {
        return check_inline_size(f);
    }
    None
}

fn check_inline_size(f: &Facts<'_>) -> Option<Decision> {
    let len = f.payload_len;
    let max_bytes = usize::try_from(f.spec.update_byte_limit()).unwrap_or(usize::MAX);
    if len > max_bytes {
        return Some(refuse(
            RejectReason::PayloadTooLarge,
            format!("update of {len} bytes exceeds the job's max_update_bytes {max_bytes}"),
        ));
    }
    let limit = f.spec.inline_limit(f.max_payload);
    if len as u64 > limit {
        return Some(refuse(
            RejectReason::PayloadTooLarge,
            format!(
                "inline payload of {len} bytes exceeds the job's inline_limit_bytes {limit}; publish it on the \
                 upload path"
            ),
        ));
    }
    None
}

/// The (job, round) key an admitted update is remembered under: its own round in synchronous
/// rounds; the buffer it goes to in the asynchronous modes (an update handed back for the next
/// buffer comes again with the same stream sequence and must be staged again).
pub fn seen_round(admitted: Admitted, update_round: RoundId) -> RoundId {
    if admitted.asynchronous {
        admitted.round
    } else {
        update_round
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{DType, JobId, ModelManifest, ModelVersion, RoundPolicy, TensorSpec, UpdateKind};

    fn spec(policy: RoundPolicy, strategy: serde_json::Value, kind: &str) -> JobSpec {
        let m = ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![4])]).unwrap();
        serde_json::from_value(serde_json::json!({
            "job": "j", "manifest": m, "round_policy": policy, "strategy": strategy,
            "update_kind": kind, "rounds": 10, "max_num_examples": 1000
        }))
        .unwrap()
    }

    fn sync() -> JobSpec {
        spec(
            RoundPolicy::Sync { cohort_size: 3, min_clients: 2, deadline_ms: 1000 },
            serde_json::json!({"name": "fedavg"}),
            "parameters",
        )
    }

    fn buffered() -> JobSpec {
        let fedbuff = serde_json::json!({"name": "fedbuff", "buffer_size": 2, "staleness": {"kind": "constant"},
            "normalisation": "by_buffer_size", "example_weight": "equal", "server_lr": 1.0});
        spec(RoundPolicy::Buffered { max_wait_ms: 1000, max_staleness: 2 }, fedbuff, "delta")
    }

    fn open(round: u64, version: u64) -> JobState {
        JobState {
            round: RoundId(round),
            model_version: ModelVersion(version),
            opened_at_ms: 1,
            ..JobState::new_job()
        }
    }

    fn headers(round: u64, base: u64, n: u64, kind: UpdateKind) -> UpdateHeaders {
        UpdateHeaders {
            round: RoundId(round),
            base_version: ModelVersion(base),
            num_examples: n,
            kind,
            upload: None,
            msg_id: None,
        }
    }

    /// Decides with everything ordinary: served, not pinned, nothing seen, a 100-byte payload.
    struct Case {
        spec: JobSpec,
        state: JobState,
        headers: UpdateHeaders,
        service: Service,
        seen: Seen,
        pinned: bool,
        applied: Option<RoundId>,
        payload_len: usize,
    }

    impl Case {
        fn new(spec: JobSpec, state: JobState, headers: UpdateHeaders) -> Case {
            Case {
                spec,
                state,
                headers,
                service: Service::Served,
                seen: Seen::new(),
                pinned: false,
                applied: None,
                payload_len: 100,
            }
        }

        fn decide(&self) -> Decision {
            let (me, client) = (NodeId::new("me").unwrap(), ClientId::new("c").unwrap());
            decide(&Facts {
                client: &client,
                stream_seq: 7,
                headers: &self.headers,
                payload_len: self.payload_len,
                spec: &self.spec,
                state: &self.state,
                pinned: self.pinned,
                applied: self.applied,
                service: &self.service,
                node: &me,
                top: None,
                max_payload: 1000 + shoal_proto::spec::HEADER_ALLOWANCE,
                seen: &self.seen,
                max_jobs: Some(1),
            })
        }

        fn reason(&self) -> RejectReason {
            match self.decide() {
                Decision::Refuse(r) => r.reason,
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_good_sync_update_is_staged_in_the_open_round() {
        let c = Case::new(sync(), open(3, 2), headers(3, 2, 10, UpdateKind::Parameters));
        assert_eq!(
            c.decide(),
            Decision::Stage(Admitted { round: RoundId(3), staleness: Staleness(0), asynchronous: false })
        );
    }

    #[test]
    fn sync_rounds_refuse_late_wrong_round_and_wrong_base_and_wait_for_the_next_round() {
        let c = |r, b| Case::new(sync(), open(3, 2), headers(r, b, 10, UpdateKind::Parameters));
        assert_eq!(c(2, 1).reason(), RejectReason::LateUpdate);
        assert_eq!(c(5, 2).reason(), RejectReason::WrongRound);
        assert_eq!(c(3, 1).reason(), RejectReason::WrongBaseVersion);
        assert_eq!(c(4, 2).decide(), Decision::Later(Later::Lagging), "the next round: our view may lag");
    }

    #[test]
    fn async_rounds_fold_stale_updates_into_the_open_buffer_up_to_max_staleness() {
        let c = |r, b| Case::new(buffered(), open(5, 4), headers(r, b, 10, UpdateKind::Delta));
        assert_eq!(
            c(3, 2).decide(),
            Decision::Stage(Admitted { round: RoundId(5), staleness: Staleness(2), asynchronous: true })
        );
        assert_eq!(c(3, 1).reason(), RejectReason::LateUpdate, "3 versions behind, the job accepts 2");
        assert_eq!(c(5, 5).reason(), RejectReason::WrongBaseVersion);
        assert_eq!(c(7, 4).reason(), RejectReason::WrongRound);
        assert_eq!(c(6, 4).decide(), Decision::Later(Later::Lagging));
        let between = Case::new(
            buffered(),
            JobState { opened_at_ms: 0, ..open(5, 4) },
            headers(5, 4, 1, UpdateKind::Delta),
        );
        assert_eq!(between.decide(), Decision::Later(Later::Lagging), "between two buffers");
    }

    #[test]
    fn weight_kind_phase_and_size_are_checked() {
        let c = |n, k| Case::new(sync(), open(1, 0), headers(1, 0, n, k));
        assert_eq!(c(0, UpdateKind::Parameters).reason(), RejectReason::InvalidWeight);
        assert_eq!(c(1001, UpdateKind::Parameters).reason(), RejectReason::InvalidWeight);
        assert_eq!(c(1000, UpdateKind::Delta).reason(), RejectReason::SchemaMismatch);
        let mut finished = c(1, UpdateKind::Parameters);
        finished.state.phase = JobPhase::Finished;
        assert_eq!(finished.reason(), RejectReason::JobNotRunning);
        let mut big = c(1, UpdateKind::Parameters);
        big.payload_len = 1001;
        assert_eq!(big.reason(), RejectReason::PayloadTooLarge, "over the node's inline limit");
        big.headers.upload =
            Some(shoal_proto::headers::Upload { chunks: 2, bytes: 1001, sha256: "0".repeat(64) });
        assert!(matches!(big.decide(), Decision::Stage(_)), "the upload path checks its size later");
    }

    #[test]
    fn redeliveries_duplicates_and_a_full_round_are_told_apart() {
        let mut c = Case::new(sync(), open(1, 0), headers(1, 0, 1, UpdateKind::Parameters));
        let round = c.seen.entry(JobId::new("j").unwrap()).or_default().entry(RoundId(1)).or_default();
        round.insert(ClientId::new("c").unwrap(), 7);
        assert_eq!(c.decide(), Decision::Redelivery, "same stream sequence");
        let round = c.seen.get_mut(&JobId::new("j").unwrap()).unwrap().get_mut(&RoundId(1)).unwrap();
        round.insert(ClientId::new("c").unwrap(), 6);
        assert_eq!(c.reason(), RejectReason::Duplicate, "another message of the client");
        let others = (0..3).map(|i| (ClientId::new(format!("o{i}")).unwrap(), i)).collect();
        c.seen.get_mut(&JobId::new("j").unwrap()).unwrap().insert(RoundId(1), others);
        assert_eq!(
            c.reason(),
            RejectReason::CohortFull,
            "cohort_size 3 is the default max_clients_per_round"
        );
    }

    #[test]
    fn a_message_id_naming_another_client_or_round_is_refused() {
        let mut c = Case::new(sync(), open(1, 0), headers(1, 0, 1, UpdateKind::Parameters));
        c.headers.msg_id = Some("j.1.c.0123456789abcdef".into());
        assert!(matches!(c.decide(), Decision::Stage(_)), "its own id");
        c.headers.msg_id = Some("j.1.c.0123456789abcdef.nonce7".into());
        assert!(matches!(c.decide(), Decision::Stage(_)), "its own id with a nonce");
        for other in
            ["j.1.victim.0123456789abcdef", "j.2.c.0123456789abcdef", "x.1.c.0123456789abcdef", "j.1.c.short"]
        {
            c.headers.msg_id = Some(other.into());
            assert_eq!(c.reason(), RejectReason::Unauthorized, "{other}");
        }
    }

    #[test]
    fn applied_copies_capacity_and_pinning_come_first() {
        let mut c = Case::new(sync(), open(1, 0), headers(1, 0, 0, UpdateKind::Parameters));
        c.applied = Some(RoundId(1));
        assert_eq!(c.decide(), Decision::AlreadyApplied(RoundId(1)), "before any other check");
        c.applied = None;
        c.service = Service::Unknown;
        assert_eq!(c.decide(), Decision::Later(Later::Undecided));
        c.service = Service::Waiting { top: Some(NodeId::new("other").unwrap()) };
        assert_eq!(c.decide(), Decision::Later(Later::Handoff));
        c.service = Service::Waiting { top: None };
        assert_eq!(c.reason(), RejectReason::NodeAtCapacity);
        c.service = Service::Served;
        c.pinned = true;
        assert_eq!(c.decide(), Decision::Later(Later::Pinned), "a whole-cohort job's top is elsewhere");
    }
}
