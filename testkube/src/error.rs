//! The error type of `shoal-testkube`.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::apply::ObjectId;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of starting the control plane and of applying manifests to it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tool binary is not where `$SHOAL_TOOLS/bin` says. The tier never skips: build the tools.
    #[error(
        "{name} not found at {}: build it with tools/build-go-tools.sh \
         (it installs into $SHOAL_TOOLS/bin, default /var/tmp/shoal-tools/bin)",
        path.display()
    )]
    MissingBinary {
        /// The binary's name (`etcd`, `kube-apiserver`).
        name: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A tool reports a version this harness refuses (for example Debian's etcd 3.4, too old for
    /// the watch bookmarks kube-apiserver 1.37 relies on).
    #[error(
        "{} reports version {found:?}, but {required} is required: build the pinned one with \
         tools/build-go-tools.sh",
        path.display()
    )]
    ToolVersion {
        /// The binary that was asked.
        path: PathBuf,
        /// What it reported (first line of `--version`).
        found: String,
        /// What is required, e.g. `etcd >= 3.6`.
        required: &'static str,
    },
    /// Starting a process (or its `--version` probe) failed.
    #[error("could not run {}", path.display())]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory of the throwaway control plane could not be created or written.
    #[error("{what}: {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// No free loopback port could be reserved.
    #[error("could not reserve a free loopback port")]
    Port(#[source] std::io::Error),
    /// The throwaway PKI could not be generated.
    #[error("generating the throwaway PKI failed")]
    Pki(#[source] rcgen::Error),
    /// A control-plane process exited while it was starting.
    #[error("{name} exited with {status} while starting; last lines of its log:\n{log_tail}")]
    Exited {
        /// `etcd` or `kube-apiserver`.
        name: &'static str,
        /// How it exited.
        status: ExitStatus,
        /// The end of its combined stdout/stderr.
        log_tail: String,
    },
    /// A control-plane process did not become ready in time.
    #[error("{name} was not ready after {waited:?}; last lines of its log:\n{log_tail}")]
    StartTimeout {
        /// `etcd` or `kube-apiserver`.
        name: &'static str,
        /// How long the harness waited.
        waited: Duration,
        /// The end of its combined stdout/stderr.
        log_tail: String,
    },
    /// The kubeconfig the harness wrote could not be loaded into a client configuration.
    #[error("loading the generated kubeconfig failed")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    /// A request to the API server failed outside of applying an object (building the client,
    /// reading a CRD's status).
    #[error("request to the API server failed")]
    Client(#[source] kube::Error),
    /// The YAML stream is not YAML.
    #[error("the manifest stream is not valid YAML")]
    Yaml(#[source] serde_saphyr::Error),
    /// A document of the stream is not a Kubernetes object this applier can apply.
    #[error("document {index} of the stream: {reason}")]
    InvalidObject {
        /// 0-based index among the non-empty documents.
        index: usize,
        /// What is missing or wrong.
        reason: String,
    },
    /// The API server refused an object (its kind is unknown to discovery, or the apply was
    /// rejected: schema, validation, admission). Objects before it in apply order were accepted.
    #[error("{object} was refused (accepted before it: {})", accepted.len())]
    Refused {
        /// The refused object (boxed to keep `Result`s small).
        object: Box<ObjectId>,
        /// The objects accepted before the refusal, in apply order.
        accepted: Vec<ObjectId>,
        /// The API server's answer ([`Error::status`] gives its `Status`).
        #[source]
        source: Box<kube::Error>,
    },
    /// A CustomResourceDefinition was accepted but did not become `Established` (and served by
    /// discovery) in time.
    #[error("CustomResourceDefinition {name} not established after {waited:?} (conditions: {conditions})")]
    NotEstablished {
        /// The CRD's name.
        name: String,
        /// How long the applier waited.
        waited: Duration,
        /// The CRD's last conditions, `type=status (reason)`.
        conditions: String,
    },
}

/// A small `Copy` classification of [`Error`], for tests and callers that branch on the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// See [`Error::MissingBinary`].
    MissingBinary,
    /// See [`Error::ToolVersion`].
    ToolVersion,
    /// See [`Error::Spawn`].
    Spawn,
    /// See [`Error::Io`].
    Io,
    /// See [`Error::Port`].
    Port,
    /// See [`Error::Pki`].
    Pki,
    /// See [`Error::Exited`].
    Exited,
    /// See [`Error::StartTimeout`].
    StartTimeout,
    /// See [`Error::Kubeconfig`].
    Kubeconfig,
    /// See [`Error::Client`].
    Client,
    /// See [`Error::Yaml`].
    Yaml,
    /// See [`Error::InvalidObject`].
    InvalidObject,
    /// See [`Error::Refused`].
    Refused,
    /// See [`Error::NotEstablished`].
    NotEstablished,
}

impl Error {
    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::MissingBinary { .. } => ErrorKind::MissingBinary,
            Error::ToolVersion { .. } => ErrorKind::ToolVersion,
            Error::Spawn { .. } => ErrorKind::Spawn,
            Error::Io { .. } => ErrorKind::Io,
            Error::Port(_) => ErrorKind::Port,
            Error::Pki(_) => ErrorKind::Pki,
            Error::Exited { .. } => ErrorKind::Exited,
            Error::StartTimeout { .. } => ErrorKind::StartTimeout,
            Error::Kubeconfig(_) => ErrorKind::Kubeconfig,
            Error::Client(_) => ErrorKind::Client,
            Error::Yaml(_) => ErrorKind::Yaml,
            Error::InvalidObject { .. } => ErrorKind::InvalidObject,
            Error::Refused { .. } => ErrorKind::Refused,
            Error::NotEstablished { .. } => ErrorKind::NotEstablished,
        }
    }

    /// The API server's `Status` when the error is its answer (a refusal or a failed request).
    /// With kube-apiserver 1.37: `code` 422 and `reason` `Invalid` for a value the schema or the
    /// built-in validation refuses; for an unknown field or a wrong type, server-side apply fails
    /// while building its typed patch and answers 500 with no reason and a message naming the
    /// field (`.spec.size: expected numeric ...`, `.datta: field not declared in schema`).
    pub fn status(&self) -> Option<&kube::core::Status> {
        let source = match self {
            Error::Refused { source, .. } => source.as_ref(),
            Error::Client(source) => source,
            _ => return None,
        };
        match source {
            kube::Error::Api(status) => Some(status),
            _ => None,
        }
    }

    /// The object the API server refused, for [`Error::Refused`].
    pub fn refused_object(&self) -> Option<&ObjectId> {
        match self {
            Error::Refused { object, .. } => Some(object),
            _ => None,
        }
    }

    /// The objects accepted before a refusal, in apply order (empty for other errors).
    pub fn accepted(&self) -> &[ObjectId] {
        match self {
            Error::Refused { accepted, .. } => accepted,
            _ => &[],
        }
    }
}

impl ErrorKind {
    /// A bounded label, e.g. for test output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::MissingBinary => "missing_binary",
            ErrorKind::ToolVersion => "tool_version",
            ErrorKind::Spawn => "spawn",
            ErrorKind::Io => "io",
            ErrorKind::Port => "port",
            ErrorKind::Pki => "pki",
            ErrorKind::Exited => "exited",
            ErrorKind::StartTimeout => "start_timeout",
            ErrorKind::Kubeconfig => "kubeconfig",
            ErrorKind::Client => "client",
            ErrorKind::Yaml => "yaml",
            ErrorKind::InvalidObject => "invalid_object",
            ErrorKind::Refused => "refused",
            ErrorKind::NotEstablished => "not_established",
        }
    }
}
