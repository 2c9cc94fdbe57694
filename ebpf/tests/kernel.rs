//! The sidecar against the real kernel: real programs, real loopback sockets, no mocks.
//!
//! Privileged tests need CAP_BPF + CAP_NET_ADMIN and cgroup v2 at the default path. Without
//! them they print `skipped: no CAP_BPF` (or `skipped: no cgroup v2`) and return, and the
//! fallback tests below still run; with `SHOAL_EBPF_REQUIRED=1` a skip is a failure instead.
//!
//! Every test owns its listeners (port 0) and its sidecar (its own maps, its own port filter),
//! so the tests of this binary run in parallel threads without seeing each other's sockets.
//! Expected values are computed from what each test sent, independently of the counters.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use shoal_ebpf::{
    default_cgroup_path, ConnectionTuple, Counters, EbpfMode, EbpfSidecar, ErrorKind, FunctionId, SockKey,
};

// ---- environment ----------------------------------------------------------------------------

const CAP_NET_ADMIN: u32 = 12;
const CAP_BPF: u32 = 39;

fn effective_caps() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

/// `Some(cgroup)` if this process may load the sidecar; otherwise prints why and returns `None`
/// (or fails, under `SHOAL_EBPF_REQUIRED=1`).
fn privileged(test: &str) -> Option<PathBuf> {
    let caps = effective_caps();
    let has = |cap: u32| caps & (1 << cap) != 0;
    let cgroup = default_cgroup_path();
    let reason = if !(has(CAP_BPF) && has(CAP_NET_ADMIN)) {
        Some("no CAP_BPF")
    } else if !cgroup.join("cgroup.controllers").is_file() {
        Some("no cgroup v2")
    } else {
        None
    };
    match reason {
        None => Some(cgroup),
        Some(reason) => {
            assert!(
                std::env::var("SHOAL_EBPF_REQUIRED").as_deref() != Ok("1"),
                "{test}: SHOAL_EBPF_REQUIRED=1 but {reason} (CapEff {caps:#x}, cgroup {})",
                cgroup.display()
            );
            println!("{test}: skipped: {reason}");
            None
        }
    }
}

// ---- sockets --------------------------------------------------------------------------------

/// One descriptor connection: the gateway's accepted socket and the host's connected one.
struct Connection {
    gateway: TcpStream,
    host: TcpStream,
    tuple: ConnectionTuple,
}

fn listen() -> (TcpListener, u16) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

fn connect(listener: &TcpListener) -> Connection {
    let host = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (gateway, peer) = listener.accept().unwrap();
    host.set_nodelay(true).unwrap();
    gateway.set_nodelay(true).unwrap();
    let tuple = ConnectionTuple::from_gateway_socket(gateway.local_addr().unwrap(), peer).unwrap();
    let from_host =
        ConnectionTuple::from_host_socket(host.local_addr().unwrap(), host.peer_addr().unwrap()).unwrap();
    assert_eq!(tuple, from_host);
    Connection { gateway, host, tuple }
}

/// Message `i` of a stream: a 4-byte little-endian length, then 60..=124 payload bytes, so
/// 64..=128 bytes in all (descriptor-sized). `salt` makes streams distinguishable.
fn message(i: usize, salt: u8) -> Vec<u8> {
    let len = 60 + (i * 7) % 65;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap().to_le_bytes());
    out.extend((0..len).map(|j| (i as u8).wrapping_mul(31) ^ (j as u8) ^ salt));
    out
}

/// Writes messages `range` with one `write` each (what SK_MSG counts); returns the bytes sent.
fn send(stream: &mut TcpStream, range: std::ops::Range<usize>, salt: u8) -> u64 {
    let mut bytes = 0;
    for i in range {
        let msg = message(i, salt);
        let n = stream.write(&msg).unwrap();
        assert_eq!(n, msg.len(), "a short write would split the message");
        bytes += msg.len() as u64;
    }
    bytes
}

/// Reads messages `range` by their length prefix and checks each against what was sent.
fn receive(stream: &mut TcpStream, range: std::ops::Range<usize>, salt: u8) {
    for i in range {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).unwrap();
        let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
        stream.read_exact(&mut payload).unwrap();
        let mut got = len.to_vec();
        got.extend_from_slice(&payload);
        assert_eq!(got, message(i, salt), "message {i} (salt {salt}) differs");
    }
}

/// `n` descriptors gateway → host, then `n` releases host → gateway, all checked byte for
/// byte. Returns the bytes sent each way.
fn exchange(conn: &mut Connection, n: usize) -> (u64, u64) {
    let to_host = send(&mut conn.gateway, 0..n, 0xd5);
    receive(&mut conn.host, 0..n, 0xd5);
    let to_gateway = send(&mut conn.host, 0..n, 0x4e);
    receive(&mut conn.gateway, 0..n, 0x4e);
    (to_host, to_gateway)
}

/// `tcpi_bytes_received` of a socket: data bytes the TCP stack delivered to it (redirected
/// bytes never pass there).
fn tcp_bytes_received(stream: &TcpStream) -> u64 {
    use std::os::fd::AsRawFd;
    const TCPI_BYTES_RECEIVED: usize = 128; // offset in struct tcp_info since Linux 4.1
    let mut info = [0u8; 256];
    let mut len = libc::socklen_t::try_from(info.len()).unwrap();
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the call, and `len`
    // points to its size; the kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt(TCP_INFO): {}", io::Error::last_os_error());
    assert!(len as usize >= TCPI_BYTES_RECEIVED + 8, "tcp_info too short: {len}");
    u64::from_ne_bytes(info[TCPI_BYTES_RECEIVED..TCPI_BYTES_RECEIVED + 8].try_into().unwrap())
}

fn id(n: u32) -> FunctionId {
    FunctionId::new(n).unwrap()
}

fn counters(msgs: usize, bytes: u64, redirected: bool) -> Counters {
    let msgs = msgs as u64;
    Counters {
        msgs,
        bytes,
        redirected: if redirected { msgs } else { 0 },
        passed: if redirected { 0 } else { msgs },
    }
}

fn sorted(mut keys: Vec<SockKey>) -> Vec<SockKey> {
    keys.sort();
    keys
}

// ---- privileged tests -----------------------------------------------------------------------

#[test]
fn redirect_delivers_the_exact_bytes_and_counts_them_per_function() {
    let Some(cgroup) = privileged("redirect_delivers_the_exact_bytes_and_counts_them_per_function") else {
        return;
    };
    let (listener, port) = listen();
    let mut sidecar = EbpfSidecar::load(EbpfMode::Required, &cgroup, &[port]).unwrap().unwrap();
    let mut conn = connect(&listener);

    // sock_ops put both ends in the SOCKHASH, each under its own 4-tuple, and nothing else.
    let expected_keys = sorted(vec![conn.tuple.gateway_key(), conn.tuple.host_key()]);
    assert_eq!(sorted(sidecar.socket_keys().unwrap()), expected_keys);

    let f = id(7);
    sidecar.register_connection(conn.tuple, f).unwrap();
    let n = 200;
    let (to_host, to_gateway) = exchange(&mut conn, n);

    let got = sidecar.function_counters(f).unwrap();
    assert_eq!(got.to_host, counters(n, to_host, true));
    assert_eq!(got.to_gateway, counters(n, to_gateway, true));
    assert_eq!(sidecar.counters().unwrap().function(f), got);
    // The bytes never went through TCP: the stack delivered none of them to either socket.
    assert_eq!(tcp_bytes_received(&conn.host), 0);
    assert_eq!(tcp_bytes_received(&conn.gateway), 0);
}

#[test]
fn kill_switch_takes_the_tcp_path_with_the_same_bytes_and_keeps_order() {
    let Some(cgroup) = privileged("kill_switch_takes_the_tcp_path_with_the_same_bytes_and_keeps_order")
    else {
        return;
    };
    let (listener, port) = listen();
    let mut sidecar = EbpfSidecar::load(EbpfMode::Required, &cgroup, &[port]).unwrap().unwrap();
    let mut conn = connect(&listener);
    let f = id(11);
    sidecar.register_connection(conn.tuple, f).unwrap();

    // Redirect off: same bytes delivered, through TCP, still counted.
    sidecar.set_redirect(false).unwrap();
    assert!(!sidecar.redirect());
    let n = 100;
    let (to_host, to_gateway) = exchange(&mut conn, n);
    let got = sidecar.function_counters(f).unwrap();
    assert_eq!(got.to_host, counters(n, to_host, false));
    assert_eq!(got.to_gateway, counters(n, to_gateway, false));
    assert_eq!(tcp_bytes_received(&conn.host), to_host);
    assert_eq!(tcp_bytes_received(&conn.gateway), to_gateway);

    // Both directions went through TCP, so they stay there: turning redirect back on while
    // descriptors sit unread must not let later ones overtake them.
    let reg = sidecar.registration(conn.tuple).unwrap().unwrap();
    assert!(reg.to_host_pinned_to_tcp && reg.to_gateway_pinned_to_tcp);
    assert_eq!(reg.function, f);
    let early = send(&mut conn.gateway, n..n + 20, 0xd5);
    sidecar.set_redirect(true).unwrap();
    let late = send(&mut conn.gateway, n + 20..n + 40, 0xd5);
    receive(&mut conn.host, n..n + 40, 0xd5);
    let got = sidecar.function_counters(f).unwrap();
    assert_eq!(got.to_host, counters(n + 40, to_host + early + late, false));

    // A connection registered after the switch is back on redirects.
    let mut fresh = connect(&listener);
    let g = id(12);
    sidecar.register_connection(fresh.tuple, g).unwrap();
    let (to_host, to_gateway) = exchange(&mut fresh, n);
    let got = sidecar.function_counters(g).unwrap();
    assert_eq!(got.to_host, counters(n, to_host, true));
    assert_eq!(got.to_gateway, counters(n, to_gateway, true));
    assert_eq!(tcp_bytes_received(&fresh.host), 0);
}

#[test]
fn redirect_off_at_once_keeps_order_of_redirected_bytes_not_yet_read() {
    let Some(cgroup) = privileged("redirect_off_at_once_keeps_order_of_redirected_bytes_not_yet_read") else {
        return;
    };
    let (listener, port) = listen();
    let mut sidecar = EbpfSidecar::load(EbpfMode::Required, &cgroup, &[port]).unwrap().unwrap();
    let mut conn = connect(&listener);
    let f = id(13);
    sidecar.register_connection(conn.tuple, f).unwrap();
    let redirected = send(&mut conn.gateway, 0..30, 0x11);
    sidecar.set_redirect(false).unwrap();
    let passed = send(&mut conn.gateway, 30..60, 0x11);
    receive(&mut conn.host, 0..60, 0x11);
    let got = sidecar.function_counters(f).unwrap().to_host;
    assert_eq!(got, Counters { msgs: 60, bytes: redirected + passed, redirected: 30, passed: 30 });
    assert_eq!(tcp_bytes_received(&conn.host), passed);
}

#[test]
fn unregistered_connections_pass_through_and_count_under_the_unregistered_bucket() {
    let Some(cgroup) =
        privileged("unregistered_connections_pass_through_and_count_under_the_unregistered_bucket")
    else {
        return;
    };
    let (listener, port) = listen();
    let mut sidecar = EbpfSidecar::load(EbpfMode::Required, &cgroup, &[port]).unwrap().unwrap();
    let mut conn = connect(&listener);
    // The host's hello, before the gateway knows who it is.
    let hello = send(&mut conn.host, 0..1, 0x77);
    receive(&mut conn.gateway, 0..1, 0x77);
    let snapshot = sidecar.counters().unwrap();
    assert_eq!(snapshot.unregistered.to_gateway, counters(1, hello, false));
    assert_eq!(snapshot.unregistered.to_host, Counters::default());
    assert!(snapshot.functions.is_empty());
    assert_eq!(tcp_bytes_received(&conn.gateway), hello);

    // Registered now (the connection is quiet): redirected from here on.
    let f = id(21);
    sidecar.register_connection(conn.tuple, f).unwrap();
    let err = sidecar.register_connection(conn.tuple, id(22)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyRegistered);
    assert_eq!(sidecar.registration(conn.tuple).unwrap().map(|r| r.function), Some(f));
    let (to_host, to_gateway) = exchange(&mut conn, 50);
    let got = sidecar.function_counters(f).unwrap();
    assert_eq!(got.to_host, counters(50, to_host, true));
    assert_eq!(got.to_gateway, counters(50, to_gateway, true));

    assert!(sidecar.unregister_connection(conn.tuple).unwrap());
    assert!(!sidecar.unregister_connection(conn.tuple).unwrap());
    assert_eq!(sidecar.registration(conn.tuple).unwrap(), None);
    // Counters outlive the registration.
    assert_eq!(sidecar.function_counters(f).unwrap(), got);
}

#[test]
fn two_sidecars_with_different_ports_do_not_interfere() {
    let Some(cgroup) = privileged("two_sidecars_with_different_ports_do_not_interfere") else {
        return;
    };
    let (listener_a, port_a) = listen();
    let (listener_b, port_b) = listen();
    let (other, _) = listen(); // not a descriptor port of either
    let mut a = EbpfSidecar::load(EbpfMode::Required, &cgroup, &[port_a]).unwrap().unwrap();
    let mut b = EbpfSidecar::load(EbpfMode::Required, &cgroup, &[port_b]).unwrap().unwrap();
    let mut conn_a = connect(&listener_a);
    let mut conn_b = connect(&listener_b);
    let mut plain = connect(&other);

    assert_eq!(
        sorted(a.socket_keys().unwrap()),
        sorted(vec![conn_a.tuple.gateway_key(), conn_a.tuple.host_key()])
    );
    assert_eq!(
        sorted(b.socket_keys().unwrap()),
        sorted(vec![conn_b.tuple.gateway_key(), conn_b.tuple.host_key()])
    );

    // The same function id in both: each sidecar counts only its own connection.
    let f = id(5);
    a.register_connection(conn_a.tuple, f).unwrap();
    b.register_connection(conn_b.tuple, f).unwrap();
    let sent_a = exchange(&mut conn_a, 80);
    let sent_b = exchange(&mut conn_b, 40);
    let sent_plain = exchange(&mut plain, 10);

    for (sidecar, (to_host, to_gateway), n) in [(&a, sent_a, 80), (&b, sent_b, 40)] {
        let snapshot = sidecar.counters().unwrap();
        assert_eq!(snapshot.functions.len(), 1);
        assert_eq!(snapshot.function(f).to_host, counters(n, to_host, true));
        assert_eq!(snapshot.function(f).to_gateway, counters(n, to_gateway, true));
        assert_eq!(snapshot.unregistered, Default::default());
    }
    assert_eq!(tcp_bytes_received(&plain.host), sent_plain.0);

    // Dropping one leaves the other redirecting.
    drop(a);
    let more = exchange(&mut conn_b, 10);
    let got = b.function_counters(f).unwrap();
    assert_eq!(got.to_host, counters(50, sent_b.0 + more.0, true));
    // And a's connection keeps working, on TCP.
    let after = exchange(&mut conn_a, 10);
    assert_eq!(tcp_bytes_received(&conn_a.host), after.0);
}

#[test]
fn drop_detaches_both_programs() {
    let Some(cgroup) = privileged("drop_detaches_both_programs") else {
        return;
    };
    let (listener, port) = listen();
    let sidecar = EbpfSidecar::load(EbpfMode::Required, &cgroup, &[port]).unwrap().unwrap();
    let (sock_ops, sk_msg) = sidecar.program_ids().unwrap();
    let loaded = || -> Vec<u32> {
        aya::programs::loaded_programs().filter_map(|info| info.ok()).map(|info| info.id()).collect()
    };
    assert!(loaded().contains(&sock_ops) && loaded().contains(&sk_msg));
    drop(sidecar);
    let ids = loaded();
    assert!(!ids.contains(&sock_ops), "sock_ops program {sock_ops} still loaded");
    assert!(!ids.contains(&sk_msg), "sk_msg program {sk_msg} still loaded");
    // Connections made afterwards are plain TCP.
    let mut conn = connect(&listener);
    let (to_host, _) = exchange(&mut conn, 10);
    assert_eq!(tcp_bytes_received(&conn.host), to_host);
}

// ---- fallback tests (run everywhere) --------------------------------------------------------

/// Collects what `tracing` prints on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn with_captured_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    (out, logs)
}

#[test]
fn auto_falls_back_with_one_warning_and_required_fails_with_the_typed_error() {
    let missing = Path::new("/sys/fs/cgroup/unified/shoal-no-such-cgroup");
    let (loaded, logs) = with_captured_logs(|| EbpfSidecar::load(EbpfMode::Auto, missing, &[7000]));
    assert!(loaded.unwrap().is_none());
    let warnings: Vec<&str> = logs.lines().filter(|line| line.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(warnings[0].contains("errno=\"ENOENT\""), "{logs}");
    assert!(warnings[0].contains("cgroup v2"), "{logs}");

    let err = EbpfSidecar::load(EbpfMode::Required, missing, &[7000]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cgroup);
    assert_eq!(err.errno(), Some(libc::ENOENT));

    // A directory that exists but is not cgroup v2 (a cgroup v1 hierarchy on hybrid hosts).
    let not_v2 = std::env::temp_dir();
    let err = EbpfSidecar::load(EbpfMode::Required, &not_v2, &[7000]).unwrap_err();
    assert!(matches!(err, shoal_ebpf::Error::NotCgroupV2(_)), "{err}");
    assert!(err.diagnosis().contains("cgroup v2"));

    // Off touches nothing and says nothing.
    let (off, logs) = with_captured_logs(|| EbpfSidecar::load(EbpfMode::Off, missing, &[]));
    assert!(off.unwrap().is_none());
    assert!(logs.is_empty(), "{logs}");

    // A bad port list is the caller's error in every mode that loads.
    for mode in [EbpfMode::Auto, EbpfMode::Required] {
        let err = EbpfSidecar::load(mode, missing, &[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    }
}

#[test]
fn fallback_keeps_plain_tcp_working() {
    // What a gateway without privileges does: `auto` yields no sidecar, descriptors flow on
    // plain TCP. On a privileged machine the sidecar is forced off by a missing cgroup.
    let privileged = privileged("fallback_keeps_plain_tcp_working (privileged part)").is_some();
    let cgroup = if privileged {
        PathBuf::from("/sys/fs/cgroup/unified/shoal-no-such-cgroup")
    } else {
        default_cgroup_path()
    };
    let (listener, port) = listen();
    let (sidecar, logs) = with_captured_logs(|| EbpfSidecar::load(EbpfMode::Auto, &cgroup, &[port]));
    assert!(sidecar.unwrap().is_none());
    let warnings: Vec<&str> = logs.lines().filter(|line| line.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    if !privileged && cgroup.join("cgroup.controllers").is_file() {
        // Refused for want of privileges: the warning says which errno and which capability.
        assert!(warnings[0].contains("errno=\"EPERM\"") && warnings[0].contains("CAP_BPF"), "{logs}");
    }
    let mut conn = connect(&listener);
    let (to_host, to_gateway) = exchange(&mut conn, 50);
    assert_eq!(tcp_bytes_received(&conn.host), to_host);
    assert_eq!(tcp_bytes_received(&conn.gateway), to_gateway);
}

#[test]
fn ipv6_connections_are_refused_by_the_tuple() {
    let v6: SocketAddr = "[::1]:7000".parse().unwrap();
    let v4: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    assert_eq!(ConnectionTuple::from_gateway_socket(v6, v4).unwrap_err().kind(), ErrorKind::Unsupported);
}

#[test]
fn bench_redirect_mode_redirects_every_message() {
    if privileged("bench_redirect_mode_redirects_every_message").is_none() {
        let err = shoal_ebpf::bench_pingpong(shoal_ebpf::BenchMode::Redirect, 10, 96).unwrap_err();
        assert_ne!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        return;
    }
    let report = shoal_ebpf::bench_pingpong(shoal_ebpf::BenchMode::Redirect, 300, 96).unwrap();
    // 300 measured + 30 warm-up round trips, two messages each.
    assert_eq!(report.redirected, 2 * 330);
    assert!(report.p50_ns > 0 && report.p50_ns <= report.p99_ns);
}
