//! [`KubeDuration`]: durations written the Kubernetes way (`60s`, `1m30s`, `500ms`).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A duration in the spelling of Kubernetes' `metav1.Duration` and Knative's annotations
/// (`stable-window: 60s`): one or more `<integer><unit>` parts with units `h`, `m`, `s`, `ms`,
/// e.g. `60s`, `1m30s`, `500ms`, `1h`. Millisecond resolution; fractions (`1.5s`) and negative
/// values are refused, so a duration always round-trips through its text exactly.
///
/// Chosen over integer seconds because the R2.1 field names (`stableWindow`,
/// `scaleToZeroGracePeriod`, `tickInterval`) are Knative's, whose values are duration strings;
/// the HPA-shaped `behavior` block keeps HPA's integer `...Seconds` fields verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KubeDuration(Duration);

/// Units accepted by [`KubeDuration`], longest suffix first so `ms` is not read as `m`.
const UNITS: [(&str, u64); 4] = [("ms", 1), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)];

impl KubeDuration {
    /// A duration of `secs` whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        KubeDuration(Duration::from_secs(secs))
    }

    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        KubeDuration(Duration::from_millis(ms))
    }

    /// The value as a [`Duration`].
    pub const fn get(self) -> Duration {
        self.0
    }

    /// The value in seconds, for rate arithmetic.
    pub fn as_secs_f64(self) -> f64 {
        self.0.as_secs_f64()
    }

    /// Parses `60s`, `1m30s`, `500ms`, `1h`.
    ///
    /// # Errors
    /// [`Error::InvalidDuration`] for empty text, a missing or unknown unit, a part without
    /// digits, or a value over `u64` milliseconds.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = |reason| Error::InvalidDuration { value: text.chars().take(80).collect(), reason };
        if text.is_empty() {
            return Err(bad("empty"));
        }
        let mut rest = text;
        let mut total: u64 = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad("expected digits, e.g. 60s, 1m30s, 500ms"));
            }
            let value: u64 = rest[..digits].parse().map_err(|_| bad("number too large"))?;
            rest = &rest[digits..];
            let (unit, ms) = UNITS
                .iter()
                .find(|(unit, _)| rest.starts_with(unit))
                .ok_or_else(|| bad("missing or unknown unit (use h, m, s or ms)"))?;
            rest = &rest[unit.len()..];
            let part = value.checked_mul(*ms).ok_or_else(|| bad("too large"))?;
            total = total.checked_add(part).ok_or_else(|| bad("too large"))?;
        }
        Ok(KubeDuration(Duration::from_millis(total)))
    }
}

impl fmt::Display for KubeDuration {
    /// Canonical text: hours, minutes, seconds and milliseconds, zero parts left out (`1m30s`,
    /// `500ms`, `0s`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl FromStr for KubeDuration {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        KubeDuration::parse(s)
    }
}

impl TryFrom<String> for KubeDuration {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        KubeDuration::parse(&s)
    }
}

impl From<KubeDuration> for String {
    fn from(d: KubeDuration) -> String {
        d.to_string()
    }
}

impl From<KubeDuration> for Duration {
    fn from(d: KubeDuration) -> Duration {
        d.0
    }
}

impl JsonSchema for KubeDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(ms|h|m|s))+$",
            "description": "A duration such as 60s, 1m30s, 500ms or 1h."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_spellings() {
        assert_eq!(KubeDuration::parse("60s").unwrap().get(), Duration::from_secs(60));
        assert_eq!(KubeDuration::parse("1m30s").unwrap().get(), Duration::from_secs(90));
        assert_eq!(KubeDuration::parse("500ms").unwrap().get(), Duration::from_millis(500));
        assert_eq!(KubeDuration::parse("1h").unwrap().get(), Duration::from_secs(3600));
        assert_eq!(KubeDuration::parse("1h2m3s4ms").unwrap().get(), Duration::from_millis(3_723_004));
        assert_eq!(KubeDuration::parse("0s").unwrap().get(), Duration::ZERO);
    }

    #[test]
    fn refuses_malformed_text() {
        for text in ["", "60", "s", "1.5s", "-1s", "60 s", "1d", "1m30", "99999999999999999999s"] {
            let err = KubeDuration::parse(text).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidDuration, "{text:?}");
        }
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        assert_eq!(KubeDuration::from_secs(90).to_string(), "1m30s");
        assert_eq!(KubeDuration::from_millis(500).to_string(), "500ms");
        assert_eq!(KubeDuration::from_secs(0).to_string(), "0s");
        assert_eq!(KubeDuration::from_millis(3_723_004).to_string(), "1h2m3s4ms");
        let json = serde_json::to_string(&KubeDuration::from_secs(60)).unwrap();
        assert_eq!(json, "\"1m\"");
        let back: KubeDuration = serde_json::from_str("\"60s\"").unwrap();
        assert_eq!(back, KubeDuration::from_secs(60));
    }
}
