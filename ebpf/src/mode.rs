//! `--ebpf off|auto|required`: whether the sidecar is wanted and what a failure to load means.

use std::fmt;
use std::str::FromStr;

/// Whether to run the eBPF sidecar (DESIGN.md §7, reference R5.3). Parsed from and shown as
/// `off`, `auto`, `required` (serde uses the same words), so it serves as a clap value through
/// [`FromStr`] and as a config field through serde.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EbpfMode {
    /// Never load: descriptors use plain TCP.
    Off,
    /// Load if this machine allows it; otherwise log one warning naming the errno and the
    /// missing capability or kernel feature, and use plain TCP.
    #[default]
    Auto,
    /// Load or fail with a typed [`crate::Error`].
    Required,
}

impl EbpfMode {
    /// Every mode, in order of strictness.
    pub const ALL: [EbpfMode; 3] = [EbpfMode::Off, EbpfMode::Auto, EbpfMode::Required];

    /// The mode's word: `off`, `auto`, `required`.
    pub fn as_str(self) -> &'static str {
        match self {
            EbpfMode::Off => "off",
            EbpfMode::Auto => "auto",
            EbpfMode::Required => "required",
        }
    }
}

impl fmt::Display for EbpfMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not `off`, `auto` or `required`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid eBPF mode {0:?}: expected off, auto or required")]
pub struct ParseEbpfModeError(String);

impl FromStr for EbpfMode {
    type Err = ParseEbpfModeError;

    /// Accepts the three words in any ASCII case, without surrounding blanks.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EbpfMode::ALL
            .into_iter()
            .find(|mode| mode.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseEbpfModeError(s.chars().take(32).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_three_words() {
        for mode in EbpfMode::ALL {
            assert_eq!(mode.to_string().parse::<EbpfMode>(), Ok(mode));
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(json, format!("\"{mode}\""));
            assert_eq!(serde_json::from_str::<EbpfMode>(&json).unwrap(), mode);
        }
        assert_eq!("Required".parse::<EbpfMode>(), Ok(EbpfMode::Required));
        assert_eq!(EbpfMode::default(), EbpfMode::Auto);
    }

    #[test]
    fn refuses_other_words() {
        for bad in ["", "on", " auto", "requiredx", "1", "\u{0}"] {
            assert!(bad.parse::<EbpfMode>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<EbpfMode>("\"on\"").is_err());
    }
}
