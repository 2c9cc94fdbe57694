//! The jobs a node serves: at most `--max-jobs` running jobs at once (unlimited by default).
//!
//! A node learns of jobs from the KV watch ([`crate::jobs::watch_jobs`]). For each running job it
//! either takes a slot and starts the job's leaf and top, or, when every slot is taken, puts the
//! job in a queue: it logs that once, counts `shoal_jobs_refused_total` and shows the queue in
//! `shoal_jobs_waiting`. A queued job starts when one of the node's jobs ends (its leaf and top
//! stop), if it is still running then.
//!
//! Meanwhile the gateway hands the queued job's updates to another node when one serves it (the
//! job's top lease is held elsewhere), and otherwise refuses them as `node_at_capacity`: with no
//! node serving the job no round of it is open, and the client learns why at once instead of
//! waiting. Job creation itself is not refused: a job waits for a node with a free slot, as a
//! batch job waits for a free machine, and the operator sees the queue in the metrics.
//!
//! Jobs that have already ended when the node first sees them (after a restart) start without a
//! slot: their leaf and top only settle what is left and stop.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use shoal_functions::JobId;

/// What the gateway should do with an update of a job, as far as capacity goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The node serves the job.
    Served,
    /// The job waits for a free slot on this node.
    Waiting,
    /// The node has not decided yet (the job watch has not delivered the job).
    Unknown,
}

/// Whether a job offered to [`JobSlots::offer`] starts now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Start it (it holds a slot when `counted`).
    Start {
        /// Whether it takes one of the `--max-jobs` slots.
        counted: bool,
    },
    /// Every slot is taken: it waits in the queue.
    Queued,
    /// Already served or queued.
    Known,
}

#[derive(Debug, Default)]
struct Inner {
    /// Served jobs, and whether each holds a slot.
    served: HashMap<JobId, bool>,
    waiting: VecDeque<JobId>,
}

/// The node's job slots (see the module docs).
#[derive(Debug)]
pub struct JobSlots {
    max: Option<usize>,
    inner: Mutex<Inner>,
    served_gauge: Gauge,
    waiting_gauge: Gauge,
    refused: Counter,
}

impl JobSlots {
    /// Slots for at most `max` running jobs (`None`: unlimited), reporting to the given metrics.
    pub fn new(max: Option<usize>, served: Gauge, waiting: Gauge, refused: Counter) -> Arc<JobSlots> {
        Arc::new(JobSlots {
            max,
            inner: Mutex::new(Inner::default()),
            served_gauge: served,
            waiting_gauge: waiting,
            refused,
        })
    }

    /// The configured maximum.
    pub fn max(&self) -> Option<usize> {
        self.max
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counted(inner: &Inner) -> usize {
        inner.served.values().filter(|&&c| c).count()
    }

    fn update_gauges(&self, inner: &Inner) {
        self.served_gauge.set(Self::counted(inner) as i64);
        self.waiting_gauge.set(inner.waiting.len() as i64);
    }

    /// Offers a job the node has just learned of; `running` is whether it is still running.
    pub fn offer(&self, job: &JobId, running: bool) -> Offer {
        let mut inner = self.lock();
        if inner.served.contains_key(job) || inner.waiting.contains(job) {
            return Offer::Known;
        }
        let offer = if !running {
            inner.served.insert(job.clone(), false);
            Offer::Start { counted: false }
        } else if self.max.is_some_and(|m| Self::counted(&inner) >= m) {
            inner.waiting.push_back(job.clone());
            self.refused.inc();
            Offer::Queued
        } else {
            inner.served.insert(job.clone(), true);
            Offer::Start { counted: true }
        };
        self.update_gauges(&inner);
        offer
    }

    /// The job's leaf and top have stopped: frees its slot and returns the queued jobs to start
    /// now (each already holds a slot). `still_running` says whether a queued job still runs;
    /// ended ones leave the queue.
    pub fn release(&self, job: &JobId, still_running: impl Fn(&JobId) -> bool) -> Vec<JobId> {
        let mut inner = self.lock();
        inner.served.remove(job);
        let mut start = Vec::new();
        while self.max.is_none_or(|m| Self::counted(&inner) < m) {
            let Some(next) = inner.waiting.pop_front() else { break };
            if still_running(&next) {
                inner.served.insert(next.clone(), true);
                start.push(next);
            }
        }
        self.update_gauges(&inner);
        start
    }

    /// What the gateway should do with `job`'s updates.
    pub fn admission(&self, job: &JobId) -> Admission {
        let inner = self.lock();
        if inner.served.contains_key(job) {
            Admission::Served
        } else if inner.waiting.contains(job) {
            Admission::Waiting
        } else {
            Admission::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(s: &str) -> JobId {
        JobId::new(s).unwrap()
    }

    fn slots(max: Option<usize>) -> Arc<JobSlots> {
        JobSlots::new(max, Gauge::default(), Gauge::default(), Counter::default())
    }

    /// Two slots: the third running job waits and starts when one ends; ended jobs start without
    /// a slot; a queued job that ended meanwhile is dropped from the queue.
    #[test]
    fn jobs_beyond_the_maximum_wait_for_a_slot() {
        let s = slots(Some(2));
        assert_eq!(s.offer(&job("a"), true), Offer::Start { counted: true });
        assert_eq!(s.offer(&job("old"), false), Offer::Start { counted: false });
        assert_eq!(s.offer(&job("b"), true), Offer::Start { counted: true });
        assert_eq!(s.offer(&job("c"), true), Offer::Queued);
        assert_eq!(s.offer(&job("d"), true), Offer::Queued);
        assert_eq!(s.offer(&job("c"), true), Offer::Known);
        assert_eq!(s.refused.get(), 2);
        assert_eq!((s.served_gauge.get(), s.waiting_gauge.get()), (2, 2));
        assert_eq!(s.admission(&job("a")), Admission::Served);
        assert_eq!(s.admission(&job("old")), Admission::Served);
        assert_eq!(s.admission(&job("c")), Admission::Waiting);
        assert_eq!(s.admission(&job("z")), Admission::Unknown);
        // An uncounted job ending frees nothing.
        assert!(s.release(&job("old"), |_| true).is_empty());
        // "c" ended while it waited: "d" takes the slot.
        assert_eq!(s.release(&job("a"), |j| j.as_str() != "c"), vec![job("d")]);
        assert_eq!(s.admission(&job("d")), Admission::Served);
        assert_eq!(s.admission(&job("c")), Admission::Unknown);
        assert_eq!((s.served_gauge.get(), s.waiting_gauge.get()), (2, 0));
    }

    #[test]
    fn unlimited_serves_everything() {
        let s = slots(None);
        for i in 0..100 {
            assert_eq!(s.offer(&job(&format!("j{i}")), true), Offer::Start { counted: true });
        }
        assert_eq!(s.served_gauge.get(), 100);
    }
}
