//! The round clock and the round's bookkeeping, as pure state machines (tested with paused
//! tokio time, without NATS): when the top closes a round, whether a collection that came up
//! short keeps it open, and the job state a round's outcome leads to.

use std::collections::HashMap;
use std::time::Duration;

use shoal_proto::cluster::{applied_ranges, CommitRecord};
use shoal_proto::{
    CollectId, JobPhase, JobSpec, JobState, ModelVersion, NodeId, RoundId, RoundOutcome, RoundRule,
};
use tokio::time::Instant;

/// When the open round closes: as soon as the leaves' fresh progress adds up to the cohort,
/// or at the deadline.
///
/// Each node's latest progress counts for `fresh` after it arrived: a node that stopped
/// reporting (it died, or handed its updates back) no longer counts once its reports lapse.
#[derive(Debug)]
pub struct RoundClock {
    deadline: Instant,
    cohort_size: u64,
    fresh: Duration,
    per_node: HashMap<NodeId, (u32, Instant)>,
}

impl RoundClock {
    /// A clock for a round whose deadline is `remaining` from `now`.
    pub fn new(now: Instant, remaining: Duration, rule: &RoundRule, fresh: Duration) -> RoundClock {
        let deadline = now + remaining;
        RoundClock { deadline, cohort_size: u64::from(rule.cohort_size), fresh, per_node: HashMap::new() }
    }

    /// The instant the round closes at the latest.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Records that `node` holds `accepted` updates of the round; `true` when the fresh counts
    /// now add up to the cohort (close the round).
    pub fn on_progress(&mut self, node: NodeId, accepted: u32, now: Instant) -> bool {
        self.per_node.insert(node, (accepted, now));
        self.fresh_count(now) >= self.cohort_size
    }

    /// The updates counted now.
    pub fn fresh_count(&self, now: Instant) -> u64 {
        self.per_node
            .values()
            .filter(|(_, at)| now.duration_since(*at) < self.fresh)
            .map(|&(n, _)| u64::from(n))
            .sum()
    }

    /// Whether a collection that found `collected` updates at `now` leaves the round open: the
    /// progress counted updates the collection did not find (a node died or handed them back
    /// since), and the deadline has not passed, so they come back through JetStream.
    pub fn keeps_open(&self, collected: u64, now: Instant) -> bool {
        now < self.deadline && collected < self.cohort_size
    }
}

/// What a round closed with, for the job state.
#[derive(Debug, Clone)]
pub struct Closing<'a> {
    /// The round.
    pub round: RoundId,
    /// How it ended.
    pub outcome: &'a RoundOutcome,
    /// The collection it closed with.
    pub collect: CollectId,
    /// The nodes whose partials went in.
    pub nodes: &'a [NodeId],
    /// The stream sequences of the updates it applied.
    pub seqs: &'a [u64],
}

/// The job state after `closing`: the commit record, the next round (closed until a top opens
/// it), the new model version when a model was committed, the count of failed rounds in a row,
/// and the job's end (`Finished` when model version `spec.rounds` is committed, `Failed` after
/// `spec.max_failed_rounds` failed rounds in a row; the round number then stays the last run).
pub fn next_state(state: &JobState, spec: &JobSpec, closing: &Closing<'_>) -> JobState {
    let mut next = state.clone();
    next.last_outcome = Some(closing.outcome.clone());
    next.last_commit = Some(CommitRecord {
        round: closing.round,
        collect: closing.collect,
        nodes: closing.nodes.to_vec(),
        applied: applied_ranges(closing.seqs.to_vec()),
    });
    next.round = closing.round.next();
    next.opened_at_ms = 0;
    next.deadline_at_ms = 0;
    let committed = matches!(closing.outcome, RoundOutcome::Committed { .. });
    if committed {
        next.model_version = state.model_version.next();
        next.failed_rounds_in_a_row = 0;
    } else {
        next.failed_rounds_in_a_row += 1;
    }
    if committed && next.model_version.0 >= spec.rounds {
        next.phase = JobPhase::Finished;
        next.round = closing.round;
    } else if next.failed_rounds_in_a_row >= spec.max_failed_rounds {
        next.phase = JobPhase::Failed {
            reason: format!("{} consecutive rounds committed nothing", next.failed_rounds_in_a_row),
        };
        next.round = closing.round;
    }
    next
}

/// The version a round commits if it produces a model.
pub fn next_version(state: &JobState) -> ModelVersion {
    state.model_version.next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{DType, ModelManifest, RoundPolicy, TensorSpec};

    fn rule(cohort: u32) -> RoundRule {
        RoundRule {
            cohort_size: cohort,
            min_clients: 1,
            deadline_ms: 10_000,
            asynchronous: false,
            max_staleness: 0,
        }
    }

    fn node(n: &str) -> NodeId {
        NodeId::new(n).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_round_closes_when_fresh_progress_reaches_the_cohort() {
        let t0 = Instant::now();
        let mut clock = RoundClock::new(t0, Duration::from_secs(10), &rule(5), Duration::from_millis(1500));
        assert_eq!(clock.deadline(), t0 + Duration::from_secs(10));
        assert!(!clock.on_progress(node("a"), 3, t0));
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!(clock.on_progress(node("b"), 2, Instant::now()), "3 + 2 = 5");
        // A report replaces the node's earlier one; it is not added to it.
        assert!(!clock.on_progress(node("b"), 1, Instant::now()), "3 + 1");
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(clock.fresh_count(Instant::now()), 1, "a's report from 1.6 s ago lapsed");
        assert!(!clock.on_progress(node("c"), 3, Instant::now()), "b 1 + c 3: a no longer counts");
        assert!(clock.on_progress(node("a"), 1, Instant::now()), "a reports again: 1 + 1 + 3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_collection_stays_open_until_the_deadline() {
        let t0 = Instant::now();
        let clock = RoundClock::new(t0, Duration::from_secs(10), &rule(4), Duration::from_secs(1));
        assert_eq!(clock.deadline(), t0 + Duration::from_secs(10));
        assert!(clock.keeps_open(3, t0), "3 of 4 before the deadline");
        assert!(!clock.keeps_open(4, t0));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!clock.keeps_open(3, Instant::now()), "at the deadline the round closes with what it has");
    }

    fn spec(rounds: u64, max_failed: u32) -> JobSpec {
        let m = ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![2])]).unwrap();
        let policy = RoundPolicy::Sync { cohort_size: 2, min_clients: 1, deadline_ms: 1000 };
        serde_json::from_value(serde_json::json!({
            "job": "j", "manifest": m, "round_policy": policy, "rounds": rounds, "max_failed_rounds": max_failed
        }))
        .unwrap()
    }

    #[test]
    fn a_commit_moves_the_version_and_the_last_one_finishes_the_job() {
        let state = JobState {
            round: RoundId(3),
            model_version: ModelVersion(2),
            opened_at_ms: 5,
            deadline_at_ms: 9,
            failed_rounds_in_a_row: 1,
            ..JobState::new_job()
        };
        let outcome = RoundOutcome::Committed { version: ModelVersion(3), clients: 2, total_weight: 7.0 };
        let nodes = [node("a")];
        let closing = Closing {
            round: RoundId(3),
            outcome: &outcome,
            collect: CollectId(9),
            nodes: &nodes,
            seqs: &[5, 4, 9],
        };
        let next = next_state(&state, &spec(10, 3), &closing);
        assert_eq!(
            (next.round, next.model_version, next.failed_rounds_in_a_row),
            (RoundId(4), ModelVersion(3), 0)
        );
        assert_eq!((next.opened_at_ms, next.deadline_at_ms, next.phase.clone()), (0, 0, JobPhase::Running));
        let rec = next.last_commit.clone().unwrap();
        assert_eq!((rec.round, rec.collect, rec.applied), (RoundId(3), CollectId(9), vec![(4, 5), (9, 9)]));
        let last = next_state(&state, &spec(3, 3), &closing);
        assert_eq!(
            (last.phase, last.round, last.model_version),
            (JobPhase::Finished, RoundId(3), ModelVersion(3))
        );
    }

    #[test]
    fn failed_rounds_keep_the_model_and_enough_of_them_fail_the_job() {
        let state = JobState {
            round: RoundId(3),
            model_version: ModelVersion(2),
            failed_rounds_in_a_row: 1,
            ..JobState::new_job()
        };
        let outcome = RoundOutcome::QuorumNotMet { accepted: 0, min_clients: 1 };
        let closing =
            Closing { round: RoundId(3), outcome: &outcome, collect: CollectId(1), nodes: &[], seqs: &[] };
        let next = next_state(&state, &spec(10, 3), &closing);
        assert_eq!(
            (next.round, next.model_version, next.failed_rounds_in_a_row),
            (RoundId(4), ModelVersion(2), 2)
        );
        let failed = next_state(&state, &spec(10, 2), &closing);
        assert_eq!(failed.round, RoundId(3));
        assert!(matches!(failed.phase, JobPhase::Failed { ref reason } if reason.contains("2 consecutive")));
    }
}
