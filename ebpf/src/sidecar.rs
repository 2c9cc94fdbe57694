//! The loaded sidecar: [`EbpfSidecar::load`] creates the maps, loads and attaches the programs
//! of the embedded object; the handle registers connections, flips the kill switch, reads the
//! counters and detaches everything on drop.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuHashMap, SockHash};
use aya::programs::sk_msg::SkMsgLinkId;
use aya::programs::sock_ops::SockOpsLinkId;
use aya::programs::{CgroupAttachMode, ProgramError, SkMsg, SockOps};
use aya::util::KernelVersion;
use aya::Ebpf;

use crate::counters::{CounterSnapshot, FunctionCounters, FunctionId, COUNTER_WORDS};
use crate::error::errno_name;
use crate::{ConnectionTuple, EbpfMode, Error, Result, SockKey};

/// The stripped object built from `bpf/shoal.bpf.c` by `build-bpf.sh`.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/shoal.bpf.o");

const SOCK_OPS: &str = "shoal_sock_ops";
const SK_MSG: &str = "shoal_sk_msg";
const MAP_SOCKS: &str = "shoal_socks";
const MAP_CONNECTIONS: &str = "shoal_connections";
const MAP_COUNTERS: &str = "shoal_counters";
const MAP_PORTS: &str = "shoal_ports";
const MAP_CONFIG: &str = "shoal_config";

/// Index of the redirect flag in `shoal_config`.
const CONFIG_REDIRECT: u32 = 0;
/// `BPF_NOEXIST`: insert only if absent.
const BPF_NOEXIST: u64 = 1;

/// Capacity of the descriptor port map (`SHOAL_MAX_PORTS` in the program).
pub const MAX_DESCRIPTOR_PORTS: usize = 64;

/// The cgroup v2 directory to attach to when none is configured: `/sys/fs/cgroup/unified` on
/// hybrid hosts (cgroup v1 controllers, v2 beside them), else `/sys/fs/cgroup`.
pub fn default_cgroup_path() -> PathBuf {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| is_cgroup_v2(path))
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// Only cgroup v2 directories have a `cgroup.controllers` file.
fn is_cgroup_v2(path: &Path) -> bool {
    path.join("cgroup.controllers").is_file()
}

/// A registered connection as the kernel sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    /// The function the connection's messages are counted for.
    pub function: FunctionId,
    /// Descriptors (gateway → host) went through TCP at least once and now always will.
    pub to_host_pinned_to_tcp: bool,
    /// Releases (host → gateway) went through TCP at least once and now always will.
    pub to_gateway_pinned_to_tcp: bool,
}

/// The eBPF sidecar of one gateway: programs attached, maps owned. Dropping it detaches both
/// programs; the sockets fall back to plain TCP.
///
/// Methods that write a map take `&mut self`; share the handle behind a mutex.
pub struct EbpfSidecar {
    // Field order is drop order: the maps close after `Drop::drop` detached the programs, and
    // `ebpf` (the programs) last.
    socks: SockHash<MapData, [u8; 12]>,
    connections: HashMap<MapData, [u8; 12], [u64; 2]>,
    counters: PerCpuHashMap<MapData, u64, [u64; COUNTER_WORDS]>,
    config: Array<MapData, u32>,
    _ports: HashMap<MapData, u32, u32>,
    sock_ops_link: Option<SockOpsLinkId>,
    sk_msg_link: Option<SkMsgLinkId>,
    ebpf: Ebpf,
    cgroup: PathBuf,
    descriptor_ports: Vec<u16>,
    redirect: bool,
}

impl fmt::Debug for EbpfSidecar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EbpfSidecar")
            .field("cgroup", &self.cgroup)
            .field("descriptor_ports", &self.descriptor_ports)
            .field("redirect", &self.redirect)
            .finish_non_exhaustive()
    }
}

impl EbpfSidecar {
    /// Loads the sidecar for a gateway whose descriptor listeners use `descriptor_ports`, with
    /// sock_ops attached to the cgroup v2 directory `cgroup` (see [`default_cgroup_path`]) in
    /// multi-program mode, so several sidecars (and other tools) coexist. Redirect starts on.
    ///
    /// - [`EbpfMode::Off`]: `Ok(None)`, nothing touched.
    /// - [`EbpfMode::Auto`]: `Ok(None)` after **one** `tracing::warn!` naming the errno and the
    ///   missing capability or kernel feature if this machine refuses (no cgroup v2, EPERM,
    ///   EINVAL, ...).
    /// - [`EbpfMode::Required`]: that refusal as the error.
    ///
    /// # Errors
    /// In every mode, a bad port list ([`Error::NoDescriptorPorts`], [`Error::InvalidPort`],
    /// [`Error::TooManyPorts`]) is the caller's error. In `required` mode, also
    /// [`Error::Cgroup`], [`Error::NotCgroupV2`], [`Error::Load`], [`Error::Program`],
    /// [`Error::Attach`], [`Error::Map`], [`Error::MissingFromObject`].
    pub fn load(mode: EbpfMode, cgroup: &Path, descriptor_ports: &[u16]) -> Result<Option<EbpfSidecar>> {
        if mode == EbpfMode::Off {
            return Ok(None);
        }
        let ports = validate_ports(descriptor_ports)?;
        match EbpfSidecar::attach(cgroup, ports) {
            Ok(sidecar) => {
                tracing::info!(cgroup = %cgroup.display(), ports = ?sidecar.descriptor_ports,
                    program_ids = ?sidecar.program_ids().ok(),
                    "eBPF sidecar attached: descriptors are redirected by SK_MSG");
                Ok(Some(sidecar))
            }
            Err(err) if mode == EbpfMode::Auto => {
                warn_fallback(&err, cgroup);
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// [`EbpfSidecar::load`] in [`EbpfMode::Required`], without the `Option`.
    ///
    /// # Errors
    /// As [`EbpfSidecar::load`] in `required` mode.
    pub fn load_required(cgroup: &Path, descriptor_ports: &[u16]) -> Result<EbpfSidecar> {
        EbpfSidecar::attach(cgroup, validate_ports(descriptor_ports)?)
    }

    /// Loads both programs, then fills the config, then attaches SK_MSG to the SOCKHASH, then
    /// sock_ops to the cgroup: a socket can only enter the map once its program is in place. On
    /// failure, `ebpf`'s drop detaches whatever was attached.
    fn attach(cgroup: &Path, descriptor_ports: Vec<u16>) -> Result<EbpfSidecar> {
        let cgroup_dir = open_cgroup_v2(cgroup)?;
        let mut ebpf = Ebpf::load(OBJECT).map_err(Error::Load)?;
        let socks: SockHash<MapData, [u8; 12]> = take_map(&mut ebpf, MAP_SOCKS)?;
        let connections = take_map(&mut ebpf, MAP_CONNECTIONS)?;
        let counters = take_map(&mut ebpf, MAP_COUNTERS)?;
        let mut config: Array<MapData, u32> = take_map(&mut ebpf, MAP_CONFIG)?;
        let mut ports: HashMap<MapData, u32, u32> = take_map(&mut ebpf, MAP_PORTS)?;

        program::<SkMsg>(&mut ebpf, SK_MSG)?.load().map_err(program_error(SK_MSG))?;
        program::<SockOps>(&mut ebpf, SOCK_OPS)?.load().map_err(program_error(SOCK_OPS))?;

        for port in &descriptor_ports {
            ports.insert(u32::from(*port), 1, 0).map_err(map_error(MAP_PORTS, "insert"))?;
        }
        config.set(CONFIG_REDIRECT, 1, 0).map_err(map_error(MAP_CONFIG, "set"))?;

        let sk_msg_link =
            program::<SkMsg>(&mut ebpf, SK_MSG)?.attach(socks.fd()).map_err(attach_error(SK_MSG))?;
        let sock_ops_link = program::<SockOps>(&mut ebpf, SOCK_OPS)?
            .attach(&cgroup_dir, cgroup_attach_mode())
            .map_err(attach_error(SOCK_OPS))?;

        Ok(EbpfSidecar {
            socks,
            connections,
            counters,
            config,
            _ports: ports,
            sock_ops_link: Some(sock_ops_link),
            sk_msg_link: Some(sk_msg_link),
            ebpf,
            cgroup: cgroup.to_path_buf(),
            descriptor_ports,
            redirect: true,
        })
    }

    /// Kernel ids of the loaded programs, `(sock_ops, sk_msg)`, as `bpftool prog show id` takes
    /// them.
    ///
    /// # Errors
    /// [`Error::Program`] if the kernel does not answer.
    pub fn program_ids(&self) -> Result<(u32, u32)> {
        let id = |name: &'static str| -> Result<u32> {
            let prog = self.ebpf.program(name).ok_or(Error::MissingFromObject(name))?;
            Ok(prog.info().map_err(program_error(name))?.id())
        };
        Ok((id(SOCK_OPS)?, id(SK_MSG)?))
    }

    /// The cgroup v2 directory sock_ops is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The descriptor listen ports whose sockets are selected, sorted.
    pub fn descriptor_ports(&self) -> &[u16] {
        &self.descriptor_ports
    }

    /// Registers a descriptor connection for `function`: its messages (both directions) are
    /// counted for it from now on, and redirected while redirect is on.
    ///
    /// Call it while the connection is quiet in both directions (every byte sent so far has
    /// been read by its receiver), e.g. after reading the host's hello and before replying:
    /// redirected bytes overtake bytes still queued in TCP.
    ///
    /// # Errors
    /// [`Error::AlreadyRegistered`] if either end is registered; [`Error::Map`] if the kernel
    /// refuses (map full: `SHOAL_MAX_CONNECTIONS` keys, two per connection).
    pub fn register_connection(&mut self, tuple: ConnectionTuple, function: FunctionId) -> Result<()> {
        let value = [function.map_key(), 0];
        let gateway = tuple.gateway_key().to_bytes();
        self.insert_new(gateway, value, tuple)?;
        if let Err(err) = self.insert_new(tuple.host_key().to_bytes(), value, tuple) {
            // Leave nothing half-registered.
            let _ = self.connections.remove(&gateway);
            return Err(err);
        }
        Ok(())
    }

    fn insert_new(&mut self, key: [u8; 12], value: [u64; 2], tuple: ConnectionTuple) -> Result<()> {
        self.connections.insert(key, value, BPF_NOEXIST).map_err(|source| {
            let err = map_error(MAP_CONNECTIONS, "insert")(source);
            if err.errno() == Some(libc::EEXIST) {
                Error::AlreadyRegistered(tuple)
            } else {
                err
            }
        })
    }

    /// Forgets a connection (call it when the connection closes): its messages are no longer
    /// counted for its function nor redirected. The function's counters stay. Returns whether
    /// it was registered.
    ///
    /// # Errors
    /// [`Error::Map`] if the kernel refuses a delete for another reason than a missing key.
    pub fn unregister_connection(&mut self, tuple: ConnectionTuple) -> Result<bool> {
        let mut found = false;
        for key in [tuple.gateway_key(), tuple.host_key()] {
            match self.connections.remove(&key.to_bytes()) {
                Ok(()) => found = true,
                Err(source) => {
                    let err = map_error(MAP_CONNECTIONS, "remove")(source);
                    if err.errno() != Some(libc::ENOENT) {
                        return Err(err);
                    }
                }
            }
        }
        Ok(found)
    }

    /// A registered connection's function and whether each direction is pinned to TCP; `None`
    /// if the connection is not registered.
    ///
    /// # Errors
    /// [`Error::Map`] if the lookup fails for another reason than a missing key.
    pub fn registration(&self, tuple: ConnectionTuple) -> Result<Option<Registration>> {
        let lookup = |key: SockKey| match self.connections.get(&key.to_bytes(), 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_error(MAP_CONNECTIONS, "read")(source)),
        };
        let (Some(to_host), Some(to_gateway)) = (lookup(tuple.gateway_key())?, lookup(tuple.host_key())?)
        else {
            return Ok(None);
        };
        let Some(function) = u32::try_from(to_host[0]).ok().and_then(FunctionId::new) else {
            return Ok(None);
        };
        // Word 1 is `{pass_pinned: u32, reserved: u32}`; reserved stays 0.
        Ok(Some(Registration {
            function,
            to_host_pinned_to_tcp: to_host[1] != 0,
            to_gateway_pinned_to_tcp: to_gateway[1] != 0,
        }))
    }

    /// The kill switch: `false` stops redirecting at once (messages take the TCP path, counters
    /// keep running); `true` resumes it for directions not pinned to TCP (a direction that sent
    /// through TCP while off stays on TCP, so its bytes cannot be reordered).
    ///
    /// # Errors
    /// [`Error::Map`] if the config map cannot be written.
    pub fn set_redirect(&mut self, on: bool) -> Result<()> {
        self.config.set(CONFIG_REDIRECT, u32::from(on), 0).map_err(map_error(MAP_CONFIG, "set"))?;
        self.redirect = on;
        Ok(())
    }

    /// Whether redirect is on (the kill switch's position).
    pub fn redirect(&self) -> bool {
        self.redirect
    }

    /// All counters, summed over CPUs.
    ///
    /// # Errors
    /// [`Error::Map`] if the map cannot be read.
    pub fn counters(&self) -> Result<CounterSnapshot> {
        let mut snapshot = CounterSnapshot::default();
        for entry in self.counters.iter() {
            let (key, per_cpu) = entry.map_err(map_error(MAP_COUNTERS, "read"))?;
            snapshot.add(key, FunctionCounters::sum_cpus(per_cpu.iter()));
        }
        Ok(snapshot)
    }

    /// One function's counters, summed over CPUs (zero if it sent nothing yet).
    ///
    /// # Errors
    /// [`Error::Map`] if the lookup fails for another reason than a missing key.
    pub fn function_counters(&self, function: FunctionId) -> Result<FunctionCounters> {
        match self.counters.get(&function.map_key(), 0) {
            Ok(per_cpu) => Ok(FunctionCounters::sum_cpus(per_cpu.iter())),
            Err(MapError::KeyNotFound) => Ok(FunctionCounters::default()),
            Err(source) => Err(map_error(MAP_COUNTERS, "read")(source)),
        }
    }

    /// Keys of the sockets sock_ops has put in the SOCKHASH (open descriptor sockets; the
    /// kernel removes a socket when it closes).
    ///
    /// # Errors
    /// [`Error::Map`] if the map cannot be read.
    pub fn socket_keys(&self) -> Result<Vec<SockKey>> {
        self.socks
            .keys()
            .map(|key| key.map(SockKey::from_bytes).map_err(map_error(MAP_SOCKS, "read")))
            .collect()
    }
}

impl Drop for EbpfSidecar {
    /// Detaches sock_ops first (no new socket enters the map), then SK_MSG. Sockets leave the
    /// SOCKHASH when the maps close right after; bytes already redirected but not yet read are
    /// then lost, so stop intake and drain connections (or close them) before dropping.
    fn drop(&mut self) {
        let _ = self.set_redirect(false);
        if let Some(link) = self.sock_ops_link.take() {
            let detached = program::<SockOps>(&mut self.ebpf, SOCK_OPS).and_then(|prog| {
                prog.detach(link).map_err(|source| Error::Attach { program: SOCK_OPS, source })
            });
            if let Err(err) = detached {
                tracing::warn!(error = %err, "detaching the eBPF sock_ops program failed");
            }
        }
        // The sockets' psocks hold the SK_MSG program, which holds this map: without an
        // explicit removal they would keep running it until they close.
        let keys: Vec<[u8; 12]> = self.socks.keys().filter_map(|key| key.ok()).collect();
        for key in keys {
            if let Err(err) = self.socks.remove(&key) {
                tracing::debug!(error = %err, "removing a socket from the SOCKHASH failed");
            }
        }
        if let Some(link) = self.sk_msg_link.take() {
            let detached = program::<SkMsg>(&mut self.ebpf, SK_MSG).and_then(|prog| {
                prog.detach(link).map_err(|source| Error::Attach { program: SK_MSG, source })
            });
            if let Err(err) = detached {
                tracing::warn!(error = %err, "detaching the eBPF sk_msg program failed");
            }
        }
    }
}

/// Sorted, deduplicated, non-zero, within capacity.
fn validate_ports(ports: &[u16]) -> Result<Vec<u16>> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        return Err(Error::NoDescriptorPorts);
    }
    if ports.contains(&0) {
        return Err(Error::InvalidPort);
    }
    if ports.len() > MAX_DESCRIPTOR_PORTS {
        return Err(Error::TooManyPorts { count: ports.len(), max: MAX_DESCRIPTOR_PORTS });
    }
    Ok(ports)
}

fn open_cgroup_v2(path: &Path) -> Result<File> {
    let dir = File::open(path).map_err(|source| Error::Cgroup { path: path.to_path_buf(), source })?;
    if !is_cgroup_v2(path) {
        return Err(Error::NotCgroupV2(path.to_path_buf()));
    }
    Ok(dir)
}

/// Several sidecars (and other tools' sock_ops programs) must share the cgroup. From 5.7 aya
/// attaches through a bpf_link, which the kernel always treats as multi-attach and which
/// refuses the `BPF_F_ALLOW_MULTI` flag (EINVAL, seen on 6.18), so pass no flag there; before
/// 5.7 aya uses `BPF_PROG_ATTACH`, which needs the flag. Same version test as aya's.
fn cgroup_attach_mode() -> CgroupAttachMode {
    match KernelVersion::current() {
        Ok(version) if version >= KernelVersion::new(5, 7, 0) => CgroupAttachMode::Single,
        _ => CgroupAttachMode::AllowMultiple,
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingFromObject(name))?;
    M::try_from(map).map_err(map_error(name, "open"))
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::MissingFromObject(name))?;
    prog.try_into().map_err(program_error(name))
}

fn program_error(program: &'static str) -> impl FnOnce(ProgramError) -> Error {
    move |source| Error::Program { program, source }
}

fn attach_error(program: &'static str) -> impl FnOnce(ProgramError) -> Error {
    move |source| Error::Attach { program, source }
}

fn map_error(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { map, op, source }
}

/// The one warning of `auto` mode.
fn warn_fallback(err: &Error, cgroup: &Path) {
    let errno = err.errno();
    tracing::warn!(
        errno = errno.map_or("none", errno_name),
        errno_code = errno.unwrap_or(0),
        missing = err.diagnosis(),
        kind = err.kind().as_str(),
        cgroup = %cgroup.display(),
        error = %error_chain(err),
        "eBPF sidecar not loaded (--ebpf auto): descriptors stay on plain TCP"
    );
}

/// The error and those of its sources it does not print already, `: `-joined, at most 2000
/// characters (a verifier log can be long).
fn error_chain(err: &Error) -> String {
    const LIMIT: usize = 2000;
    let mut out = err.to_string();
    let mut next = std::error::Error::source(err);
    while let Some(source) = next {
        // Most messages already print their source; add only what is new.
        let text = source.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = source.source();
    }
    if out.len() > LIMIT {
        let cut = (0..=LIMIT).rev().find(|&i| out.is_char_boundary(i)).unwrap_or(0);
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handle_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<EbpfSidecar>();
    }

    #[test]
    fn ports_are_validated() {
        assert_eq!(validate_ports(&[7001, 7000, 7001]).unwrap(), vec![7000, 7001]);
        assert_eq!(validate_ports(&[]).unwrap_err().kind(), crate::ErrorKind::InvalidConfig);
        assert!(matches!(validate_ports(&[0, 7000]), Err(Error::InvalidPort)));
        let many: Vec<u16> = (1..=65).collect();
        assert!(matches!(validate_ports(&many), Err(Error::TooManyPorts { count: 65, max: 64 })));
        let most: Vec<u16> = (1..=64).collect();
        assert_eq!(validate_ports(&most).unwrap().len(), 64);
    }

    #[test]
    fn embedded_object_is_an_elf_bpf_object() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        assert_eq!(OBJECT.as_ptr() as usize % 8, 0);
        // e_machine at offset 18 is EM_BPF (247), little-endian ELF.
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }

    #[test]
    fn error_chain_is_bounded() {
        let err = Error::Io { what: "x", source: std::io::Error::other("é".repeat(3000)) };
        let chain = error_chain(&err);
        assert!(chain.len() <= 2003, "{}", chain.len());
        assert!(chain.starts_with("benchmark: x failed"));
        let err = Error::Cgroup {
            path: PathBuf::from("/x"),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(error_chain(&err).matches("os error 2").count(), 1, "{}", error_chain(&err));
    }
}
