//! The descriptor data plane of a node's processes: whether descriptor channels run over plain
//! loopback TCP or through the eBPF sidecar ([`shoal_ebpf`], DESIGN.md §7), shared by `shoal
//! node --descriptor-channel loopback-tcp` and a separate gateway process.
//!
//! - [`DataplaneConfig`]: `--ebpf off|auto|required`, the cgroup v2 directory sock_ops attaches
//!   to (default: the one this process runs in, [`own_cgroup_v2`]) and how often the counters are
//!   summed into the metrics.
//! - [`Dataplane`]: the loaded sidecar (or none: plain TCP). The owner of the descriptor listener
//!   loads it once its port is known ([`Dataplane::load`]); each accepted channel is registered
//!   under its function host's [`FunctionId`] once the handshake is over
//!   ([`Dataplane::register`]), which returns a guard that unregisters it when the connection
//!   ends; [`Dataplane::spawn`] runs the counter tick (per-CPU counters summed into
//!   `shoal_descriptor_messages_total` and friends) and the kill switch.
//!
//! **Kill switch.** `SIGUSR1` turns redirect off (descriptors continue on plain TCP at once,
//! nothing is lost, counters keep counting), `SIGUSR2` turns it back on for directions not
//! pinned to TCP meanwhile; `shoal_ebpf_redirect_enabled` shows the position. Dropping the last
//! clone of a [`Dataplane`] detaches the programs (after the node's tasks ended, at shutdown); a
//! process that dies has its programs detached by the kernel (the links are file descriptors).
//!
//! **Sharing a cgroup.** Each sidecar has its own maps and selects only sockets of its own
//! descriptor ports; every other socket passes through its programs untouched, so several nodes
//! (tests run many at once) and other tools' programs coexist on one cgroup.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shoal_ebpf::{ConnectionTuple, CounterSnapshot, Direction, EbpfMode, EbpfSidecar, FunctionCounters};
use shoal_proto::FunctionId;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

fn ebpf(source: shoal_ebpf::Error) -> Error {
    Error::Ebpf { source }
}

/// How a process sets up its descriptor data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// `off`: plain TCP; `auto`: the sidecar if this machine allows it, else one warning and
    /// plain TCP; `required`: the sidecar or a typed error ([`Error::Ebpf`]).
    pub ebpf: EbpfMode,
    /// The cgroup v2 directory to attach sock_ops to; `None`: the cgroup this process runs in
    /// ([`own_cgroup_v2`]), whose sockets (the descriptor channels' included) it sees.
    pub cgroup: Option<PathBuf>,
    /// How often the per-CPU counters are summed into the metrics.
    pub counters_interval: Duration,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig { ebpf: EbpfMode::Auto, cgroup: None, counters_interval: Duration::from_secs(1) }
    }
}

impl DataplaneConfig {
    /// The cgroup sock_ops attaches to: the configured one, else this process's own.
    pub fn cgroup_dir(&self) -> PathBuf {
        self.cgroup.clone().unwrap_or_else(own_cgroup_v2)
    }
}

/// The cgroup v2 directory of this process: the `0::<path>` line of `/proc/self/cgroup` under
/// the cgroup2 mount of `/proc/self/mounts`. Falls back to [`shoal_ebpf::default_cgroup_path`]
/// when either cannot be read (the load then reports what is missing).
pub fn own_cgroup_v2() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_dir_of(&mounts, &cgroups).unwrap_or_else(shoal_ebpf::default_cgroup_path)
}

/// The pure part of [`own_cgroup_v2`]: the first `cgroup2` mount point joined with the
/// process's v2 path (a path reaching outside the namespace's root, `/..`, is refused).
fn cgroup_dir_of(mounts: &str, cgroups: &str) -> Option<PathBuf> {
    let mount = mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, point, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(point))
    })?;
    let own = cgroups.lines().find_map(|line| line.strip_prefix("0::"))?.trim();
    let relative = Path::new(own.trim_start_matches('/'));
    if relative.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return None;
    }
    Some(mount.join(relative))
}

/// The descriptor data plane of one process: the eBPF sidecar, or none (plain TCP). Cheap to
/// clone; the programs detach when the last clone is dropped.
#[derive(Debug, Clone, Default)]
pub struct Dataplane {
    sidecar: Option<Arc<Mutex<EbpfSidecar>>>,
    mode: EbpfMode,
}

impl Dataplane {
    /// Plain TCP: no sidecar.
    pub fn plain() -> Dataplane {
        Dataplane { sidecar: None, mode: EbpfMode::Off }
    }

    /// Loads the sidecar for descriptor listeners on `ports` as `config` says (see
    /// [`EbpfSidecar::load`]: `auto` logs one warning and returns plain TCP on a refusal).
    ///
    /// # Errors
    /// [`Error::Ebpf`]: in `required` mode, the refusal with its diagnosis
    /// ([`shoal_ebpf::Error::diagnosis`]); in any mode, an invalid port list.
    pub fn load(config: &DataplaneConfig, ports: &[u16]) -> Result<Dataplane> {
        let cgroup = config.cgroup_dir();
        let sidecar = EbpfSidecar::load(config.ebpf, &cgroup, ports).map_err(ebpf)?;
        Ok(Dataplane { sidecar: sidecar.map(|s| Arc::new(Mutex::new(s))), mode: config.ebpf })
    }

    /// Whether the sidecar's programs are attached (descriptors can be redirected).
    pub fn is_attached(&self) -> bool {
        self.sidecar.is_some()
    }

    /// The mode it was loaded in.
    pub fn mode(&self) -> EbpfMode {
        self.mode
    }

    fn lock(&self) -> Option<MutexGuard<'_, EbpfSidecar>> {
        self.sidecar.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Registers the gateway's end `stream` of a descriptor channel for `function`: from now on
    /// its messages count for that function and are redirected while redirect is on. Call it
    /// once the handshake is over and before the first descriptor (the connection quiet both
    /// ways). Keep the returned guard while the connection lives; it unregisters on drop.
    /// Without a sidecar, a guard that does nothing.
    ///
    /// # Errors
    /// [`Error::FunctionIdZero`]; [`Error::Ebpf`]:, an IPv6 socket, a connection already
    /// registered, a full map. With `--ebpf auto` the caller may go on unregistered (plain TCP,
    /// counted as `unregistered`).
    pub fn register(&self, stream: &TcpStream, function: FunctionId) -> Result<Registered> {
        let Some(mut sidecar) = self.lock() else {
            return Ok(Registered { dataplane: None, tuple: None });
        };
        let io = |e| Error::io("descriptor channel address", e);
        let tuple = ConnectionTuple::from_gateway_socket(
            stream.local_addr().map_err(io)?,
            stream.peer_addr().map_err(io)?,
        )
        .map_err(ebpf)?;
        let id = shoal_ebpf::FunctionId::new(function.0).ok_or(Error::FunctionIdZero)?;
        sidecar.register_connection(tuple, id).map_err(ebpf)?;
        tracing::debug!(%tuple, %function, "descriptor channel registered with the eBPF sidecar");
        Ok(Registered { dataplane: Some(self.clone()), tuple: Some(tuple) })
    }

    /// The kill switch: `false` sends every descriptor through plain TCP from now on; `true`
    /// redirects again (directions that used TCP meanwhile stay on it). Returns whether a
    /// sidecar is loaded (without one, nothing to switch).
    ///
    /// # Errors
    /// [`Error::Ebpf`] if the kernel refuses the map write.
    pub fn set_redirect(&self, on: bool) -> Result<bool> {
        let Some(mut sidecar) = self.lock() else { return Ok(false) };
        sidecar.set_redirect(on).map_err(ebpf)?;
        Ok(true)
    }

    /// Whether redirect is on (`false` without a sidecar).
    pub fn redirect(&self) -> bool {
        self.lock().is_some_and(|s| s.redirect())
    }

    /// The kernel's counters summed over CPUs; `None` without a sidecar.
    ///
    /// # Errors
    /// [`Error::Ebpf`] if the map cannot be read.
    pub fn counters(&self) -> Result<Option<CounterSnapshot>> {
        let Some(sidecar) = self.lock() else { return Ok(None) };
        sidecar.counters().map(Some).map_err(ebpf)
    }

    /// Sums the counters into `metrics` (the per-function families and the sidecar gauges).
    ///
    /// # Errors
    /// [`Error::Ebpf`] if the map cannot be read.
    pub fn export(&self, metrics: &Metrics) -> Result<()> {
        metrics.ebpf_attached.set(i64::from(self.is_attached()));
        metrics.ebpf_redirect.set(i64::from(self.redirect()));
        let Some(snapshot) = self.counters()? else { return Ok(()) };
        export_counters(metrics, "unregistered", &snapshot.unregistered);
        for (function, counters) in &snapshot.functions {
            export_counters(metrics, &function.to_string(), counters);
        }
        Ok(())
    }

    /// Runs the counter tick (every `interval`, and once more at `cancel`) and the kill switch
    /// (`SIGUSR1` off, `SIGUSR2` on) on `tracker` until `cancel`. Without a sidecar it only sets
    /// the gauges and installs the signal handlers (so the signals never kill the process; they
    /// log that nothing is loaded).
    pub fn spawn(
        &self,
        metrics: Arc<Metrics>,
        interval: Duration,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) {
        let (plane, stop) = (self.clone(), cancel.clone());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut logged = false;
            loop {
                let done = tokio::select! {
                    _ = stop.cancelled() => true,
                    _ = tick.tick() => false,
                };
                if let Err(e) = plane.export(&metrics) {
                    if !std::mem::replace(&mut logged, true) {
                        tracing::warn!(error = %e, "reading the eBPF counters failed (logged once)");
                    }
                }
                if done {
                    break;
                }
            }
        });
        let plane = self.clone();
        tracker.spawn(async move { plane.kill_switch(cancel).await });
    }

    async fn kill_switch(self, cancel: CancellationToken) {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut off, mut on) =
            match (signal(SignalKind::user_defined1()), signal(SignalKind::user_defined2())) {
                (Ok(off), Ok(on)) => (off, on),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot install the eBPF kill switch (SIGUSR1/SIGUSR2)");
                    return;
                }
            };
        loop {
            let wanted = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = off.recv() => false,
                _ = on.recv() => true,
            };
            match self.set_redirect(wanted) {
                Ok(true) => tracing::warn!(
                    redirect = wanted,
                    "eBPF kill switch: descriptor redirect turned {}",
                    if wanted { "on" } else { "off (plain TCP)" }
                ),
                Ok(false) => tracing::warn!(
                    redirect = wanted,
                    "eBPF kill switch: no sidecar loaded; descriptors use plain TCP"
                ),
                Err(e) => tracing::error!(error = %e, "eBPF kill switch failed"),
            }
        }
    }
}

/// Sets the families of one function to the kernel's sums (they only grow; a lower value, which
/// only a new sidecar could show, is left alone until it catches up).
fn export_counters(metrics: &Metrics, function: &str, counters: &FunctionCounters) {
    for direction in [Direction::ToHost, Direction::ToGateway] {
        let c = counters.direction(direction);
        let label = crate::metrics::FunctionDirectionLabel {
            function: function.to_owned(),
            direction: direction.as_str(),
        };
        for (family, value) in [
            (&metrics.descriptor_messages, c.msgs),
            (&metrics.descriptor_bytes, c.bytes),
            (&metrics.descriptor_messages_redirected, c.redirected),
        ] {
            let counter = family.get_or_create(&label);
            let now = counter.get();
            if value > now {
                counter.inc_by(value - now);
            }
        }
    }
}

/// A descriptor channel registered with the sidecar; unregisters it on drop.
#[derive(Debug)]
pub struct Registered {
    dataplane: Option<Dataplane>,
    tuple: Option<ConnectionTuple>,
}

impl Registered {
    /// Whether the channel is registered with a loaded sidecar (its descriptors can be
    /// redirected).
    pub fn is_registered(&self) -> bool {
        self.tuple.is_some()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let (Some(plane), Some(tuple)) = (&self.dataplane, self.tuple) else { return };
        if let Some(mut sidecar) = plane.lock() {
            if let Err(e) = sidecar.unregister_connection(tuple) {
                tracing::debug!(error = %e, %tuple, "unregistering a descriptor channel failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "sysfs /sys sysfs rw 0 0\n\
        cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n";

    #[test]
    fn the_process_cgroup_is_found_under_the_cgroup2_mount() {
        let root = "4:memory:/x\n0::/\n";
        assert_eq!(cgroup_dir_of(MOUNTS, root), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let nested = "0::/system.slice/shoal.service\n";
        assert_eq!(
            cgroup_dir_of(MOUNTS, nested),
            Some(PathBuf::from("/sys/fs/cgroup/unified/system.slice/shoal.service"))
        );
        // Outside this namespace's root, no v2 line, no cgroup2 mount: not guessed.
        assert_eq!(cgroup_dir_of(MOUNTS, "0::/../other\n"), None);
        assert_eq!(cgroup_dir_of(MOUNTS, "4:memory:/x\n"), None);
        assert_eq!(cgroup_dir_of("sysfs /sys sysfs rw 0 0\n", "0::/\n"), None);
    }

    #[test]
    fn off_is_plain_tcp_and_a_plain_dataplane_counts_nothing() {
        let config = DataplaneConfig { ebpf: EbpfMode::Off, ..DataplaneConfig::default() };
        let plane = Dataplane::load(&config, &[7000]).expect("off never fails");
        assert!(!plane.is_attached());
        assert!(!plane.set_redirect(false).expect("nothing to switch"));
        assert!(plane.counters().expect("none").is_none());
        let metrics = Metrics::default();
        plane.export(&metrics).expect("export");
        assert!(metrics.encode().contains("shoal_ebpf_sidecar_attached 0"));
    }

    #[test]
    fn counters_are_set_to_the_kernels_sums() {
        let metrics = Metrics::default();
        let mut c = FunctionCounters::default();
        c.to_host.msgs = 12;
        c.to_host.bytes = 12 * 213;
        c.to_host.redirected = 12;
        export_counters(&metrics, "1", &c);
        export_counters(&metrics, "1", &c); // a second tick with the same sums adds nothing
        let text = metrics.encode();
        assert!(
            text.contains("shoal_descriptor_messages_total{function=\"1\",direction=\"to_host\"} 12"),
            "{text}"
        );
        assert!(
            text.contains("shoal_descriptor_bytes_total{function=\"1\",direction=\"to_host\"} 2556"),
            "{text}"
        );
        assert!(text.contains("shoal_descriptor_messages_total{function=\"1\",direction=\"to_gateway\"} 0"));
    }
}
