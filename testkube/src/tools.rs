//! Finding the tool binaries and checking their versions before anything starts.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// The oldest etcd this harness runs: 3.6 (Debian ships 3.4.23, which kube-apiserver 1.37 cannot
/// use for watch-list and progress-notify bookmarks).
pub const MIN_ETCD: (u32, u32) = (3, 6);

const MIN_ETCD_TEXT: &str = "etcd >= 3.6";

/// `path` if it is a file, else [`Error::MissingBinary`] naming `tools/build-go-tools.sh`.
pub(crate) fn locate(name: &'static str, path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingBinary { name, path })
    }
}

/// Runs `etcd --version` and refuses anything older than [`MIN_ETCD`]; returns the version text
/// (e.g. `3.6.16`).
pub(crate) fn check_etcd(path: &Path) -> Result<String> {
    let output = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|source| Error::Spawn { path: path.to_owned(), source })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let refuse = || Error::ToolVersion {
        path: path.to_owned(),
        found: text.lines().next().unwrap_or("").to_owned(),
        required: MIN_ETCD_TEXT,
    };
    let version = parse_etcd_version(&text).ok_or_else(refuse)?;
    if etcd_version_ok(&version) {
        Ok(version)
    } else {
        Err(refuse())
    }
}

/// The version in `etcd --version` output (`etcd Version: 3.6.16` → `3.6.16`).
pub fn parse_etcd_version(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether an etcd version text (`3.6.16`, `3.7.0-alpha.0`) is at least [`MIN_ETCD`].
pub fn etcd_version_ok(version: &str) -> bool {
    let mut parts = version.split(['.', '-']).map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= MIN_ETCD,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_version_is_read_from_the_first_line() {
        let out = "etcd Version: 3.6.16\nGit SHA: GitNotFound\nGo Version: go1.26.8\n";
        assert_eq!(parse_etcd_version(out).as_deref(), Some("3.6.16"));
        assert_eq!(parse_etcd_version("nothing here"), None);
        assert_eq!(parse_etcd_version("etcd Version: \n"), None);
    }

    #[test]
    fn debian_etcd_34_is_refused_and_36_up_accepted() {
        assert!(!etcd_version_ok("3.4.23"));
        assert!(!etcd_version_ok("3.5.21"));
        assert!(etcd_version_ok("3.6.0"));
        assert!(etcd_version_ok("3.6.16"));
        assert!(etcd_version_ok("3.7.0-alpha.0"));
        assert!(etcd_version_ok("4.0.0"));
        assert!(!etcd_version_ok("garbage"));
        assert!(!etcd_version_ok("3"));
    }

    #[test]
    fn a_missing_binary_names_the_build_script() {
        let err = locate("etcd", PathBuf::from("/nonexistent/bin/etcd")).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::MissingBinary);
        let text = err.to_string();
        assert!(text.contains("tools/build-go-tools.sh"), "{text}");
        assert!(text.contains("/nonexistent/bin/etcd"), "{text}");
    }
}
