//! Per-function descriptor counters: the layout of `shoal_counters` and its decoding.
//!
//! The map is a `PERCPU_HASH` keyed by the function id (`u64`; 0 collects the messages of
//! descriptor connections not registered yet). Its value is one block of four `u64` per
//! direction, `{msgs, bytes, redirected, passed}`, to-host block first; the kernel keeps one
//! value per possible CPU and [`FunctionCounters::sum_cpus`] adds them up.
//!
//! What is counted where: `shoal_sk_msg` runs on the *sending* socket, once per `sendmsg`
//! (so one per descriptor when each descriptor is written with one call). Messages sent by the
//! gateway's socket (its local port is a descriptor port) count as [`Direction::ToHost`]:
//! descriptors. Messages sent by a function host count as [`Direction::ToGateway`]: release
//! replies and the host's registration. `bytes` is the size of each `sendmsg`; `redirected` and
//! `passed` split `msgs` by path taken.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;

/// Words of one value in `shoal_counters` (two directions × four counters).
pub(crate) const COUNTER_WORDS: usize = 8;

/// A function host on a node, as the gateway numbers it when the host registers (1, 2, ...;
/// 0 is never assigned: it is the sidecar's bucket for unregistered connections). The eBPF maps
/// hold it widened to `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct FunctionId(pub NonZeroU32);

impl FunctionId {
    /// The id, or `None` for 0.
    pub fn new(id: u32) -> Option<FunctionId> {
        NonZeroU32::new(id).map(FunctionId)
    }

    /// The id as a number.
    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// The key of this function in `shoal_counters` and the value in `shoal_connections`.
    pub(crate) fn map_key(self) -> u64 {
        u64::from(self.get())
    }
}

impl fmt::Display for FunctionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which way a message went on a descriptor connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Sent by the gateway: descriptors.
    ToHost,
    /// Sent by a function host: release replies (and its registration).
    ToGateway,
}

impl Direction {
    /// A bounded label for metrics: `to_host`, `to_gateway`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToHost => "to_host",
            Direction::ToGateway => "to_gateway",
        }
    }
}

/// Counters of one direction of one function, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// `sendmsg` calls seen (one per descriptor written with one call).
    pub msgs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Of `msgs`, those moved straight into the peer socket by SK_MSG.
    pub redirected: u64,
    /// Of `msgs`, those left to the TCP stack (redirect off, peer not in the map, connection
    /// not registered, or the direction pinned to TCP).
    pub passed: u64,
}

impl Counters {
    fn from_words(words: [u64; 4]) -> Counters {
        let [msgs, bytes, redirected, passed] = words;
        Counters { msgs, bytes, redirected, passed }
    }

    /// `self + other`, each counter wrapping at 2^64 like the kernel's.
    pub fn plus(self, other: Counters) -> Counters {
        Counters {
            msgs: self.msgs.wrapping_add(other.msgs),
            bytes: self.bytes.wrapping_add(other.bytes),
            redirected: self.redirected.wrapping_add(other.redirected),
            passed: self.passed.wrapping_add(other.passed),
        }
    }
}

/// Both directions of one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct FunctionCounters {
    /// Gateway → host: descriptors.
    pub to_host: Counters,
    /// Host → gateway: release replies.
    pub to_gateway: Counters,
}

impl FunctionCounters {
    /// Decodes one CPU's value of `shoal_counters`.
    pub(crate) fn from_words(words: [u64; COUNTER_WORDS]) -> FunctionCounters {
        let [a, b, c, d, e, f, g, h] = words;
        FunctionCounters {
            to_host: Counters::from_words([a, b, c, d]),
            to_gateway: Counters::from_words([e, f, g, h]),
        }
    }

    /// Sums the per-CPU values of one key.
    pub(crate) fn sum_cpus<'a>(
        per_cpu: impl IntoIterator<Item = &'a [u64; COUNTER_WORDS]>,
    ) -> FunctionCounters {
        per_cpu
            .into_iter()
            .fold(FunctionCounters::default(), |sum, words| sum.plus(FunctionCounters::from_words(*words)))
    }

    /// `self + other`, per direction.
    pub fn plus(self, other: FunctionCounters) -> FunctionCounters {
        FunctionCounters {
            to_host: self.to_host.plus(other.to_host),
            to_gateway: self.to_gateway.plus(other.to_gateway),
        }
    }

    /// One direction.
    pub fn direction(&self, direction: Direction) -> Counters {
        match direction {
            Direction::ToHost => self.to_host,
            Direction::ToGateway => self.to_gateway,
        }
    }

    /// Both directions added.
    pub fn total(&self) -> Counters {
        self.to_host.plus(self.to_gateway)
    }
}

/// All counters of a sidecar at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CounterSnapshot {
    /// Per registered function (functions never seen are absent; unregistering a connection
    /// keeps its function's counters, which only grow).
    pub functions: BTreeMap<FunctionId, FunctionCounters>,
    /// Messages on descriptor connections before they were registered.
    pub unregistered: FunctionCounters,
}

impl CounterSnapshot {
    /// Files one decoded map entry. Keys above `u32::MAX` are never written by this crate; they
    /// are ignored rather than trusted.
    pub(crate) fn add(&mut self, key: u64, counters: FunctionCounters) {
        if key == 0 {
            self.unregistered = self.unregistered.plus(counters);
        } else if let Some(id) = u32::try_from(key).ok().and_then(FunctionId::new) {
            let slot = self.functions.entry(id).or_default();
            *slot = slot.plus(counters);
        }
    }

    /// One function's counters (zero if never seen).
    pub fn function(&self, id: FunctionId) -> FunctionCounters {
        self.functions.get(&id).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_decode_to_host_block_first() {
        let c = FunctionCounters::from_words([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(c.to_host, Counters { msgs: 1, bytes: 2, redirected: 3, passed: 4 });
        assert_eq!(c.to_gateway, Counters { msgs: 5, bytes: 6, redirected: 7, passed: 8 });
        assert_eq!(c.direction(Direction::ToGateway), c.to_gateway);
        assert_eq!(c.total(), Counters { msgs: 6, bytes: 8, redirected: 10, passed: 12 });
    }

    #[test]
    fn cpus_are_summed_and_wrap_like_the_kernel() {
        let cpus =
            [[1, 100, 1, 0, 0, 0, 0, 0], [2, 50, 0, 2, 1, 8, 1, 0], [0; 8], [u64::MAX, 0, 0, 0, 0, 0, 0, 0]];
        let sum = FunctionCounters::sum_cpus(&cpus);
        assert_eq!(sum.to_host, Counters { msgs: 2, bytes: 150, redirected: 1, passed: 2 });
        assert_eq!(sum.to_gateway, Counters { msgs: 1, bytes: 8, redirected: 1, passed: 0 });
        assert_eq!(FunctionCounters::sum_cpus(&[]), FunctionCounters::default());
    }

    #[test]
    fn snapshot_files_keys() {
        let mut snap = CounterSnapshot::default();
        let one = FunctionCounters::from_words([1, 10, 1, 0, 0, 0, 0, 0]);
        snap.add(0, one);
        snap.add(7, one);
        snap.add(7, one);
        snap.add(u64::from(u32::MAX) + 1, one); // never written by us: ignored
        assert_eq!(snap.unregistered, one);
        let seven = FunctionId::new(7).unwrap();
        assert_eq!(snap.function(seven).to_host.msgs, 2);
        assert_eq!(snap.functions.len(), 1);
        assert_eq!(snap.function(FunctionId::new(8).unwrap()), FunctionCounters::default());
    }

    #[test]
    fn function_id_zero_is_not_an_id() {
        assert_eq!(FunctionId::new(0), None);
        assert_eq!(FunctionId::new(3).map(FunctionId::map_key), Some(3));
        assert_eq!(serde_json::to_string(&FunctionId::new(3)).unwrap(), "3");
        assert!(serde_json::from_str::<FunctionId>("0").is_err());
    }
}
