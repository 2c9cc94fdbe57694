//! One child process of the control plane: started with its output in a log file, killed and
//! reaped on drop.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{Error, Result};

/// How much of the end of a log an error quotes.
const LOG_TAIL_BYTES: u64 = 6 * 1024;

/// A running etcd or kube-apiserver. Dropping it sends SIGKILL and waits for the exit, so no
/// process outlives the test that started it (the data is in a temp dir thrown away anyway).
#[derive(Debug)]
pub(crate) struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `binary args...` with stdout and stderr appended to `log`.
    pub(crate) fn spawn(name: &'static str, binary: &Path, args: &[String], log: PathBuf) -> Result<Self> {
        let io_err = |source| Error::Io { what: "creating a process log", path: log.clone(), source };
        let out = File::create(&log).map_err(io_err)?;
        let err = out.try_clone().map_err(io_err)?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| Error::Spawn { path: binary.to_owned(), source })?;
        Ok(Self { name, child, log })
    }

    /// `etcd` or `kube-apiserver`.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The process id.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// The log file (stdout and stderr).
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// [`Error::Exited`] if the process has ended.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(Error::Exited { name: self.name, status, log_tail: self.log_tail() }),
            Ok(None) => Ok(()),
            Err(source) => Err(Error::Io { what: "polling a child process", path: self.log.clone(), source }),
        }
    }

    /// The last few KiB of the log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let read = || -> std::io::Result<String> {
            let mut file = File::open(&self.log)?;
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        read().unwrap_or_else(|e| format!("(log {} unreadable: {e})", self.log.display()))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Already exited (e.g. a start-up failure): kill fails with InvalidInput, wait reaps.
        let _ = self.child.kill();
        if let Err(e) = self.child.wait() {
            tracing::warn!(name = self.name, pid = self.child.id(), error = %e, "could not reap");
        }
    }
}
