//! The `FederatedJob`'s status as a pure function of what reconcile observed: the job's state
//! in NATS, the autoscaler's decision, the Deployments' ready replicas, competing autoscalers
//! and the spec's validity. Conditions keep their `lastTransitionTime` while their status holds;
//! [`Built::transitions`] lists the conditions whose status or reason changed, which is when
//! reconcile records an Event.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use shoal_proto::{JobPhase, JobState, RoundOutcome};

use crate::autoscaler::Decision;
use crate::crd::{AutoscalingStatus, ConditionType, FederatedJobStatus, LastOutcome, Phase};

/// Why the operator does not run the job as its spec asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The spec does not validate; the message names the field.
    InvalidSpec(String),
    /// `spec.jobSpec` differs from the job already stored in NATS (a job spec is immutable).
    JobSpecChanged(String),
}

/// The autoscaler's part of what reconcile observed.
#[derive(Debug, Clone, Copy)]
pub struct Scaling<'a> {
    /// The decision in force (the last tick's).
    pub decision: &'a Decision,
    /// Ready replicas per node (the Deployments' `status.readyReplicas`).
    pub ready: &'a BTreeMap<String, u32>,
    /// Fresh demand reports that list the job.
    pub nodes_serving_job: usize,
    /// When the host count last changed.
    pub last_scale_time: Option<Timestamp>,
}

/// Everything one status is computed from.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// Now.
    pub now: Timestamp,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The status before this reconcile.
    pub previous: Option<&'a FederatedJobStatus>,
    /// Why the job is not run as asked, if it is not.
    pub problem: Option<Problem>,
    /// `spec.suspend`.
    pub suspended: bool,
    /// The job's state in NATS (`None`: not created yet).
    pub state: Option<&'a JobState>,
    /// The node holding the job's top lease.
    pub top_node: Option<String>,
    /// The autoscaler's view (`None` while suspended, invalid or ended).
    pub scaling: Option<Scaling<'a>>,
    /// Hosts per node asked for (the Deployments' replicas after this reconcile).
    pub desired: &'a BTreeMap<String, u32>,
    /// Competing autoscalers (`HorizontalPodAutoscaler ns/name targets Deployment d`).
    pub conflicts: &'a [String],
    /// Time after a round's deadline before the round counts as stuck, ms.
    pub deadline_grace_ms: u64,
}

/// A condition that changed status or reason in this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The condition.
    pub kind: ConditionType,
    /// Its new status.
    pub status: bool,
    /// Its new reason.
    pub reason: String,
    /// Its new message.
    pub message: String,
}

/// The new status and its transitions.
#[derive(Debug, Clone)]
pub struct Built {
    /// The status to write.
    pub status: FederatedJobStatus,
    /// Conditions whose status or reason changed.
    pub transitions: Vec<Transition>,
}

type Cond = (ConditionType, bool, &'static str, String);

/// Computes the status.
pub fn build(f: &Facts<'_>) -> Built {
    let phase = phase(f);
    let desired_total: u32 = f.desired.values().sum();
    let ready_total: u32 = f.scaling.map_or(0, |s| {
        f.desired.keys().map(|n| s.ready.get(n).copied().unwrap_or(0).min(f.desired[n])).sum()
    });
    let mut status = FederatedJobStatus {
        observed_generation: f.generation,
        phase: Some(phase),
        top_node: f.top_node.clone(),
        hosts: Some(format!("{ready_total}/{desired_total}")),
        desired_hosts: desired_total,
        ready_hosts: ready_total,
        ..FederatedJobStatus::default()
    };
    if let Some(state) = f.state {
        mirror_state(&mut status, state);
    }
    if let Some(s) = f.scaling {
        let previous_scale =
            f.previous.and_then(|p| p.autoscaling.as_ref()).and_then(|a| a.last_scale_time.clone());
        status.autoscaling = Some(AutoscalingStatus {
            mode: s.decision.mode.as_str().to_owned(),
            desired_hosts_per_node: f.desired.clone(),
            ready_hosts_per_node: s.ready.clone(),
            observed_rate_per_node: s
                .decision
                .observed_rate
                .iter()
                .map(|(n, r)| (n.to_string(), *r))
                .collect(),
            backlog: s.decision.backlog,
            recommendation: s.decision.recommendation,
            last_scale_time: s.last_scale_time.map(Time).or(previous_scale),
        });
    }
    let conds = [
        ready_condition(f, phase),
        scaling_active(f, phase),
        scaling_limited(f),
        round_progressing(f, phase),
        degraded(f, ready_total, desired_total),
    ];
    let (conditions, transitions) = merge(f, &conds);
    status.conditions = conditions;
    Built { status, transitions }
}

fn phase(f: &Facts<'_>) -> Phase {
    if matches!(f.problem, Some(Problem::InvalidSpec(_))) {
        return Phase::Invalid;
    }
    match f.state.map(|s| &s.phase) {
        Some(JobPhase::Finished) => Phase::Finished,
        Some(JobPhase::Failed { .. }) => Phase::Failed,
        Some(JobPhase::Cancelled { .. }) => Phase::Cancelled,
        _ if f.suspended => Phase::Suspended,
        Some(JobPhase::Running) => Phase::Running,
        None => Phase::Pending,
    }
}

fn mirror_state(status: &mut FederatedJobStatus, state: &JobState) {
    status.round = Some(state.round.0);
    status.model_version = Some(state.model_version.0);
    let at = |ms: u64| (ms > 0).then(|| Timestamp::from_millisecond(ms as i64).ok().map(Time)).flatten();
    status.round_opened_at = at(state.opened_at_ms);
    status.round_deadline = at(state.deadline_at_ms);
    if let JobPhase::Failed { reason } | JobPhase::Cancelled { reason } = &state.phase {
        status.failure_reason = Some(reason.clone());
    }
    status.last_outcome = state.last_outcome.as_ref().map(|o| LastOutcome {
        outcome: match o {
            RoundOutcome::Committed { .. } => "Committed",
            RoundOutcome::QuorumNotMet { .. } => "QuorumNotMet",
            RoundOutcome::AggregationFailed { .. } => "AggregationFailed",
        }
        .to_owned(),
        message: o.to_string(),
    });
    status.updates = state.last_outcome.as_ref().and_then(|o| match o {
        RoundOutcome::Committed { clients, .. } => Some(*clients),
        _ => None,
    });
}

fn ready_condition(f: &Facts<'_>, phase: Phase) -> Cond {
    let c = |status, reason, message: String| (ConditionType::Ready, status, reason, message);
    match (&f.problem, phase) {
        (Some(Problem::InvalidSpec(m)), _) => c(false, "InvalidSpec", m.clone()),
        (Some(Problem::JobSpecChanged(m)), _) => c(false, "JobSpecChanged", m.clone()),
        (_, Phase::Failed) => c(
            false,
            "JobFailed",
            format!("the job failed: {}", f.state.map(|s| s.phase.to_string()).unwrap_or_default()),
        ),
        (_, Phase::Finished) => c(true, "JobFinished", "the last round committed".into()),
        (_, Phase::Suspended) => c(false, "Suspended", "spec.suspend is set: no function hosts run".into()),
        (_, Phase::Pending) => c(false, "JobPending", "the job is not in NATS yet".into()),
        _ => c(true, "JobRunning", "the job is running in NATS".into()),
    }
}

fn scaling_active(f: &Facts<'_>, phase: Phase) -> Cond {
    let c = |status, reason, message: String| (ConditionType::ScalingActive, status, reason, message);
    if let Some(conflict) = f.conflicts.first() {
        return c(false, "ConflictingAutoscaler", format!("{conflict}; Shoal owns function-host replicas"));
    }
    match (phase, f.scaling) {
        (Phase::Invalid, _) => c(false, "InvalidSpec", "the spec does not validate".into()),
        (Phase::Suspended, _) => c(false, "Suspended", "spec.suspend is set".into()),
        (Phase::Finished | Phase::Failed, _) => {
            c(false, "JobEnded", "the job ended; no hosts are needed".into())
        }
        (_, Some(s)) if s.nodes_serving_job > 0 => {
            c(true, "DemandReported", format!("{} node(s) report demand for the job", s.nodes_serving_job))
        }
        _ => c(
            false,
            "NoDemandReports",
            "no node reports demand for the job; hosts are left as they are".into(),
        ),
    }
}

fn scaling_limited(f: &Facts<'_>) -> Cond {
    match f.scaling.and_then(|s| s.decision.limited) {
        Some(limit) => (
            ConditionType::ScalingLimited,
            true,
            limit.as_str(),
            format!(
                "{} hosts recommended, {} allowed",
                f.scaling.map_or(0, |s| s.decision.recommendation),
                f.scaling.map_or(0, |s| s.decision.total)
            ),
        ),
        None => (ConditionType::ScalingLimited, false, "DesiredWithinRange", "no limit applies".into()),
    }
}

fn round_progressing(f: &Facts<'_>, phase: Phase) -> Cond {
    let c = |status, reason, message: String| (ConditionType::RoundProgressing, status, reason, message);
    let Some(state) = f.state.filter(|_| phase == Phase::Running || phase == Phase::Suspended) else {
        return c(false, "JobNotRunning", format!("the job is {}", phase.as_str()));
    };
    if !state.is_open() {
        return c(true, "WaitingForRound", format!("round {} waits for a node to open it", state.round));
    }
    let now_ms = u64::try_from(f.now.as_millisecond()).unwrap_or(0);
    let overdue = now_ms.saturating_sub(state.deadline_at_ms);
    if now_ms > state.deadline_at_ms.saturating_add(f.deadline_grace_ms) {
        return c(
            false,
            "DeadlineExceeded",
            format!(
                "round {} is {:.0}s past its deadline and has not closed",
                state.round,
                overdue as f64 / 1000.0
            ),
        );
    }
    c(true, "RoundOpen", format!("round {} is open", state.round))
}

fn degraded(f: &Facts<'_>, ready: u32, desired: u32) -> Cond {
    let c = |status, reason, message: String| (ConditionType::Degraded, status, reason, message);
    if let Some(conflict) = f.conflicts.first() {
        return c(true, "ConflictingAutoscaler", conflict.clone());
    }
    if f.scaling.is_some() && ready < desired {
        return c(true, "HostsNotReady", format!("{ready} of {desired} function hosts are ready"));
    }
    c(false, "AsExpected", "nothing keeps the job from running as asked".into())
}

fn merge(f: &Facts<'_>, conds: &[Cond]) -> (Vec<Condition>, Vec<Transition>) {
    let previous: &[Condition] = f.previous.map_or(&[], |p| p.conditions.as_slice());
    let mut out = Vec::with_capacity(conds.len());
    let mut transitions = Vec::new();
    for (kind, ok, reason, message) in conds {
        let status = if *ok { "True" } else { "False" };
        let old = previous.iter().find(|c| c.type_ == kind.as_str());
        let same_status = old.is_some_and(|o| o.status == status);
        if !same_status || old.is_some_and(|o| o.reason != *reason) {
            transitions.push(Transition {
                kind: *kind,
                status: *ok,
                reason: (*reason).to_owned(),
                message: message.clone(),
            });
        }
        out.push(Condition {
            type_: kind.as_str().to_owned(),
            status: status.to_owned(),
            reason: (*reason).to_owned(),
            message: message.clone(),
            observed_generation: f.generation,
            last_transition_time: match old {
                Some(o) if same_status => o.last_transition_time.clone(),
                _ => Time(f.now),
            },
        });
    }
    (out, transitions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{ModelVersion, RoundId};

    fn facts<'a>(state: &'a JobState, previous: Option<&'a FederatedJobStatus>, now: Timestamp) -> Facts<'a> {
        const EMPTY: &BTreeMap<String, u32> = &BTreeMap::new();
        Facts {
            now,
            generation: Some(3),
            previous,
            problem: None,
            suspended: false,
            state: Some(state),
            top_node: Some("node-a".into()),
            scaling: None,
            desired: EMPTY,
            conflicts: &[],
            deadline_grace_ms: 30_000,
        }
    }

    /// Conditions keep their transition time while their status holds, and a change of status
    /// or reason is reported once.
    #[test]
    fn transition_times_hold_until_the_status_changes() {
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        let mut state = JobState::new_job();
        let first = build(&facts(&state, None, t0));
        assert_eq!(first.transitions.len(), 5, "every condition is new");
        let t1 = Timestamp::from_second(1_000_010).unwrap();
        let again = build(&facts(&state, Some(&first.status), t1));
        assert!(again.transitions.is_empty(), "{:?}", again.transitions);
        assert!(again.status.conditions.iter().all(|c| c.last_transition_time.0 == t0));
        // The round opens at t1 with a 60 s deadline; 100 s later it is 40 s past it, beyond
        // the 30 s grace.
        state.opened_at_ms = 1_000_010_000;
        state.deadline_at_ms = 1_000_070_000;
        let t2 = Timestamp::from_second(1_000_110).unwrap();
        let stuck = build(&facts(&state, Some(&again.status), t2));
        assert_eq!(stuck.transitions.len(), 1);
        let tr = &stuck.transitions[0];
        assert_eq!(
            (tr.kind, tr.status, tr.reason.as_str()),
            (ConditionType::RoundProgressing, false, "DeadlineExceeded")
        );
        let cond = stuck.status.conditions.iter().find(|c| c.type_ == "RoundProgressing").unwrap();
        assert_eq!(cond.last_transition_time.0, t2);
        // Finished: the outcome, the updates column and the phase follow the state.
        state.phase = JobPhase::Finished;
        state.model_version = ModelVersion(3);
        state.round = RoundId(4);
        state.last_outcome =
            Some(RoundOutcome::Committed { version: ModelVersion(3), clients: 17, total_weight: 170.0 });
        let done = build(&facts(&state, Some(&stuck.status), t2));
        assert_eq!(done.status.phase, Some(Phase::Finished));
        assert_eq!(
            (done.status.round, done.status.model_version, done.status.updates),
            (Some(4), Some(3), Some(17))
        );
        assert_eq!(done.status.last_outcome.as_ref().map(|o| o.outcome.as_str()), Some("Committed"));
        assert_eq!(done.status.top_node.as_deref(), Some("node-a"));
        assert!(done.transitions.iter().any(|t| t.kind == ConditionType::Ready && t.reason == "JobFinished"));
    }
}
