//! Identifier and unit newtypes (DESIGN.md §1). String ids become NATS subject tokens and
//! KV/object keys, so they are validated on every path in (construction, `FromStr`, serde):
//! 1–64 characters from `[A-Za-z0-9_-]`. Numeric ids are plain `u64` on the wire
//! (`#[serde(transparent)]`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: use 1-64 characters from [A-Za-z0-9_-]")]
pub struct InvalidId {
    /// Which identifier (job, client, node).
    pub what: &'static str,
    /// The rejected value (truncated to 80 characters).
    pub value: String,
}

fn check_token(what: &'static str, s: &str) -> Result<(), InvalidId> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidId { what, value: s.chars().take(80).collect() })
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, InvalidId> {
                let s = s.into();
                check_token($what, &s)?;
                Ok(Self(s))
            }
            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Self::new(s)
            }
        }
        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                Self::new(s)
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

string_id!(
    /// One FL training run.
    JobId, "job id");
string_id!(
    /// A participant that trains locally and publishes updates.
    ClientId, "client id");
string_id!(
    /// One machine running a gateway and function hosts.
    NodeId, "node id");

macro_rules! number_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
        impl FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map(Self)
            }
        }
    };
}

number_id!(
    /// One aggregation step of a job, numbered from 1.
    RoundId);
number_id!(
    /// Version of the global model; version 0 is the initial model, round r commits version r'
    /// (a failed round commits nothing, so versions and rounds can drift apart).
    ModelVersion);

number_id!(
    /// Staleness τ of an update: the current global model version minus the version the client
    /// trained from, in model versions (server steps). 0 for an update on the current model and
    /// in synchronous rounds.
    Staleness);
number_id!(
    /// One collection of partial aggregates by a job's top (a new top, or a retry, uses a new
    /// one); a commit names the collection it closed with.
    CollectId);
number_id!(
    /// One coordinate-sharded exchange of a round (a retry uses a new one).
    ExchangeId);
number_id!(
    /// One process of a node (random per start): names the holder of a lease or a claim, so a
    /// restarted process is told apart from its predecessor.
    InstanceId);

/// Why a staleness cannot be computed: the update claims a base version newer than the
/// current model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("update base version {base} is newer than the current model version {current}")]
pub struct FutureBase {
    /// The update's base version.
    pub base: ModelVersion,
    /// The current global model version.
    pub current: ModelVersion,
}

impl Staleness {
    /// `current − base`.
    ///
    /// # Errors
    /// [`FutureBase`] if `base > current` (a client cannot have trained on a model that does
    /// not exist yet; the update is refused).
    pub fn between(current: ModelVersion, base: ModelVersion) -> Result<Staleness, FutureBase> {
        current.0.checked_sub(base.0).map(Staleness).ok_or(FutureBase { base, current })
    }
}

/// A function host on a node: assigned by the node's gateway when the host registers (1, 2,
/// ...; 0 is never assigned), named in every descriptor sent to it and in the per-function
/// counters of the eBPF sidecar (`u32` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(transparent)]
pub struct FunctionId(pub u32);

impl fmt::Display for FunctionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where an aggregator sits in a job's hierarchy (DESIGN.md §1, §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Per node: folds the client updates staged there.
    Leaf,
    /// Merges the partials of a group of `fan_in` leaves.
    Middle,
    /// One per job: merges everything, applies the server step and commits.
    Top,
}

impl Tier {
    /// Every tier, leaf first.
    pub const ALL: [Tier; 3] = [Tier::Leaf, Tier::Middle, Tier::Top];

    /// Bounded label (metrics, subject tokens): `leaf`, `middle`, `top`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Leaf => "leaf",
            Tier::Middle => "middle",
            Tier::Top => "top",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RoundId {
    /// The round after this one.
    pub fn next(self) -> RoundId {
        RoundId(self.0 + 1)
    }
}

impl ModelVersion {
    /// The version after this one.
    pub fn next(self) -> ModelVersion {
        ModelVersion(self.0 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_subject_breaking_characters() {
        assert!(ClientId::new("client-07_a").is_ok());
        for bad in ["", "a.b", "a b", "a*", ">", "a/b", &"x".repeat(65)] {
            assert!(ClientId::new(bad).is_err(), "{bad:?} accepted");
        }
        let e = JobId::new("a.b").unwrap_err();
        assert_eq!(e.what, "job id");
    }

    #[test]
    fn ids_validate_when_deserialized() {
        let ok: JobId = serde_json::from_str("\"mnist\"").unwrap();
        assert_eq!(ok.as_str(), "mnist");
        assert!(serde_json::from_str::<JobId>("\"a.b\"").is_err());
    }
}
