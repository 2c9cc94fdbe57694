//! The error type of `shoal-ebpf`, and the diagnosis of kernel refusals.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the eBPF sidecar. Configuration errors ([`ErrorKind::InvalidConfig`],
/// [`ErrorKind::Unsupported`], [`ErrorKind::AlreadyRegistered`]) are the caller's; the others are
/// refusals by this machine (privileges, kernel features, cgroup setup), which
/// [`Error::diagnosis`] explains.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No descriptor port was given: the sock_ops program would select no socket.
    #[error("no descriptor port given: the sidecar would select no socket")]
    NoDescriptorPorts,
    /// Port 0 is not a listen port.
    #[error("descriptor port 0 is not a listen port")]
    InvalidPort,
    /// More descriptor ports than the program's port map holds.
    #[error("{count} descriptor ports given, the sidecar holds at most {max}")]
    TooManyPorts {
        /// Ports given.
        count: usize,
        /// Capacity of the port map.
        max: usize,
    },
    /// An address is not IPv4. The programs handle IPv4 sockets only (an IPv4-mapped address
    /// on an IPv6 socket is an `AF_INET6` socket to the kernel and is not redirected either).
    #[error("{0} is not an IPv4 address: the sidecar redirects IPv4 sockets only")]
    NotIpv4(SocketAddr),
    /// The connection is registered already; registering it again could reorder its bytes (see
    /// the crate documentation), so it must be unregistered first.
    #[error("connection {0} is already registered")]
    AlreadyRegistered(crate::ConnectionTuple),
    /// The cgroup directory could not be opened.
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        /// The configured cgroup path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The path is not a cgroup v2 directory (no `cgroup.controllers` in it): sock_ops programs
    /// attach to cgroup v2 only.
    #[error("{0} is not a cgroup v2 directory (sock_ops programs need cgroup v2)")]
    NotCgroupV2(PathBuf),
    /// Parsing the object or creating its maps failed.
    #[error("creating the eBPF maps failed: {0}")]
    Load(#[source] aya::EbpfError),
    /// The kernel refused to load a program (the verifier log is in the source).
    #[error("loading eBPF program {program} failed: {source}")]
    Program {
        /// Program name in the object.
        program: &'static str,
        /// The failure.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Attaching a program failed.
    #[error("attaching eBPF program {program} failed: {source}")]
    Attach {
        /// Program name in the object.
        program: &'static str,
        /// The failure.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("eBPF map {map}: {op} failed: {source}")]
    Map {
        /// Map name in the object.
        map: &'static str,
        /// What was done (`insert`, `remove`, `read`...).
        op: &'static str,
        /// The failure.
        #[source]
        source: aya::maps::MapError,
    },
    /// A program or map the loader expects is not in the embedded object (a build bug).
    #[error("the embedded eBPF object lacks {0} (stale ebpf/bpf/shoal.bpf.o?)")]
    MissingFromObject(&'static str),
    /// A benchmark parameter is out of range.
    #[error("benchmark: {0}")]
    InvalidBench(&'static str),
    /// A socket operation of the benchmark failed.
    #[error("benchmark: {what} failed: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// A small `Copy` classification of [`Error`], for callers that branch on the kind and for
/// bounded metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// [`Error::NoDescriptorPorts`], [`Error::InvalidPort`], [`Error::TooManyPorts`],
    /// [`Error::InvalidBench`].
    InvalidConfig,
    /// [`Error::NotIpv4`].
    Unsupported,
    /// [`Error::AlreadyRegistered`].
    AlreadyRegistered,
    /// [`Error::Cgroup`], [`Error::NotCgroupV2`].
    Cgroup,
    /// [`Error::Load`].
    Load,
    /// [`Error::Program`].
    Program,
    /// [`Error::Attach`].
    Attach,
    /// [`Error::Map`].
    Map,
    /// [`Error::MissingFromObject`].
    MissingFromObject,
    /// [`Error::Io`].
    Io,
}

impl Error {
    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoDescriptorPorts
            | Error::InvalidPort
            | Error::TooManyPorts { .. }
            | Error::InvalidBench(_) => ErrorKind::InvalidConfig,
            Error::NotIpv4(_) => ErrorKind::Unsupported,
            Error::AlreadyRegistered(_) => ErrorKind::AlreadyRegistered,
            Error::Cgroup { .. } | Error::NotCgroupV2(_) => ErrorKind::Cgroup,
            Error::Load(_) => ErrorKind::Load,
            Error::Program { .. } => ErrorKind::Program,
            Error::Attach { .. } => ErrorKind::Attach,
            Error::Map { .. } => ErrorKind::Map,
            Error::MissingFromObject(_) => ErrorKind::MissingFromObject,
            Error::Io { .. } => ErrorKind::Io,
        }
    }

    /// The OS error number under this error, if a system call failed.
    pub fn errno(&self) -> Option<i32> {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = next {
            if let Some(io) = err.downcast_ref::<io::Error>() {
                if let Some(code) = io.raw_os_error() {
                    return Some(code);
                }
            }
            // aya's `IoError`/`IOError` variants are `#[error(transparent)]`: their `source()`
            // skips the `io::Error` itself, so look inside.
            let transparent = match (
                err.downcast_ref::<aya::maps::MapError>(),
                err.downcast_ref::<aya::programs::ProgramError>(),
            ) {
                (Some(aya::maps::MapError::IoError(io)), _) => Some(io),
                (_, Some(aya::programs::ProgramError::IOError(io))) => Some(io),
                _ => None,
            };
            if let Some(code) = transparent.and_then(io::Error::raw_os_error) {
                return Some(code);
            }
            next = err.source();
        }
        None
    }

    /// What this machine lacks, in words an operator can act on: the missing capability, kernel
    /// feature or cgroup setup behind [`Error::errno`].
    pub fn diagnosis(&self) -> &'static str {
        if let Error::NotCgroupV2(_) = self {
            return "no cgroup v2 at the configured path: mount cgroup2 or configure the cgroup path to a cgroup v2 directory";
        }
        match self.errno() {
            Some(code) => diagnose_errno(code, self.kind()),
            None => match self.kind() {
                ErrorKind::InvalidConfig | ErrorKind::Unsupported | ErrorKind::AlreadyRegistered => {
                    "a configuration or caller error, not a machine limit"
                }
                ErrorKind::MissingFromObject => "the embedded eBPF object is stale: rebuild it",
                _ => "the kernel refused the eBPF object (see the error chain)",
            },
        }
    }
}

/// Symbolic name of the errno values the kernel returns to BPF and cgroup calls.
pub fn errno_name(code: i32) -> &'static str {
    match code {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::ENOENT => "ENOENT",
        libc::ENOTDIR => "ENOTDIR",
        libc::EBADF => "EBADF",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        ENOTSUPP => "ENOTSUPP",
        libc::ENOMEM => "ENOMEM",
        libc::E2BIG => "E2BIG",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        _ => "errno",
    }
}

/// The kernel-internal "operation not supported" (524) that BPF calls leak to user space.
const ENOTSUPP: i32 = 524;

fn diagnose_errno(code: i32, kind: ErrorKind) -> &'static str {
    match code {
        libc::EPERM | libc::EACCES => {
            "missing CAP_BPF and CAP_NET_ADMIN (or root); on kernels before 5.8 CAP_SYS_ADMIN"
        }
        libc::EINVAL => {
            "kernel too old or missing a feature: SK_MSG needs 4.17, SOCKHASH 4.18, sock_ops \
             4.13, the sk_msg_md fields used 5.0; 5.10 or later is recommended"
        }
        libc::ENOENT | libc::ENOTDIR if kind == ErrorKind::Cgroup => {
            "no cgroup v2 at the configured path: mount cgroup2 or configure the cgroup path to a cgroup v2 directory"
        }
        libc::EBADF if kind == ErrorKind::Attach => {
            "the cgroup path is not a cgroup v2 directory (sock_ops needs cgroup v2)"
        }
        libc::ENOSYS => "the kernel has no bpf() system call (CONFIG_BPF_SYSCALL off)",
        libc::EOPNOTSUPP | ENOTSUPP => {
            "the kernel lacks SOCKHASH or cgroup BPF (CONFIG_BPF_STREAM_PARSER, CONFIG_CGROUP_BPF)"
        }
        libc::ENOMEM => "RLIMIT_MEMLOCK too low (kernels before 5.11 charge BPF maps to it)",
        libc::E2BIG => "kernel too old for this object's attributes (5.10 or later recommended)",
        libc::EBUSY => "another program holds the attach point exclusively",
        _ => "the kernel refused the eBPF object (see the error chain)",
    }
}

impl ErrorKind {
    /// A bounded label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::AlreadyRegistered => "already_registered",
            ErrorKind::Cgroup => "cgroup",
            ErrorKind::Load => "load",
            ErrorKind::Program => "program",
            ErrorKind::Attach => "attach",
            ErrorKind::Map => "map",
            ErrorKind::MissingFromObject => "missing_from_object",
            ErrorKind::Io => "io",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach_error(code: i32) -> Error {
        Error::Attach {
            program: "shoal_sock_ops",
            source: aya::programs::ProgramError::IOError(io::Error::from_raw_os_error(code)),
        }
    }

    #[test]
    fn errno_is_found_under_aya_errors_and_named() {
        let err = attach_error(libc::EPERM);
        assert_eq!(err.errno(), Some(libc::EPERM));
        assert_eq!(errno_name(libc::EPERM), "EPERM");
        assert!(err.diagnosis().contains("CAP_BPF"));
        assert!(attach_error(libc::EINVAL).diagnosis().contains("4.17"));
        assert!(attach_error(libc::EBADF).diagnosis().contains("cgroup v2"));
        let map = Error::Map {
            map: "shoal_connections",
            op: "insert",
            source: aya::maps::MapError::IoError(io::Error::from_raw_os_error(libc::ENOMEM)),
        };
        assert_eq!(map.errno(), Some(libc::ENOMEM));
    }

    #[test]
    fn kinds_have_bounded_labels() {
        assert_eq!(Error::NoDescriptorPorts.kind(), ErrorKind::InvalidConfig);
        assert_eq!(Error::NotCgroupV2(PathBuf::from("/x")).kind(), ErrorKind::Cgroup);
        assert!(Error::NotCgroupV2(PathBuf::from("/x")).diagnosis().contains("cgroup v2"));
        assert_eq!(Error::NoDescriptorPorts.errno(), None);
        assert_eq!(ErrorKind::AlreadyRegistered.as_str(), "already_registered");
        assert_eq!(
            serde_json::to_string(&ErrorKind::MissingFromObject).ok().as_deref(),
            Some("\"missing_from_object\"")
        );
    }
}
