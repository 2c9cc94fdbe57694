//! Raw message round trips over loopback TCP, with and without SK_MSG redirect (blocking std
//! sockets, the `pingpong` example). `shoal bench dataplane` measures the descriptor channel
//! itself (tokio sockets, real frames) against the in-process path.
//!
//! One thread plays the function host: it writes a `size`-byte message (one `write`,
//! `TCP_NODELAY`) and waits for the reply. Another plays the gateway and echoes each message
//! back whole. Latency is the round trip seen by the host thread; both modes use the same code,
//! the redirect mode with a sidecar loaded for the listener's port and the connection
//! registered. Run both modes in one process and compare ratios, not absolute figures.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::thread;
use std::time::Instant;

use crate::sidecar::default_cgroup_path;
use crate::{ConnectionTuple, EbpfSidecar, Error, FunctionId, Result};

/// Largest message the benchmark sends (a descriptor is ~100 bytes; this leaves room to see
/// where copying starts to dominate).
pub const MAX_BENCH_MESSAGE: usize = 64 * 1024;

/// Which path the messages take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchMode {
    /// Plain loopback TCP.
    Plain,
    /// SK_MSG redirect (needs what [`EbpfSidecar::load_required`] needs).
    Redirect,
}

impl BenchMode {
    /// A bounded label: `plain`, `redirect`.
    pub fn as_str(self) -> &'static str {
        match self {
            BenchMode::Plain => "plain",
            BenchMode::Redirect => "redirect",
        }
    }
}

/// Result of one [`bench_pingpong`] run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BenchReport {
    /// The path measured.
    pub mode: BenchMode,
    /// Round trips measured (after the warm-up).
    pub messages: usize,
    /// Bytes per message.
    pub size: usize,
    /// Median round-trip latency, nanoseconds.
    pub p50_ns: u64,
    /// 99th-percentile round-trip latency, nanoseconds.
    pub p99_ns: u64,
    /// Round trips completed per second (one descriptor and its reply each).
    pub messages_per_sec: f64,
    /// Messages the sidecar redirected, both directions, warm-up included (0 in plain mode):
    /// the evidence that the redirect mode did redirect.
    pub redirected: u64,
}

/// Measures `messages` round trips of `size`-byte messages between two threads over loopback
/// TCP, through SK_MSG redirect or not, after a warm-up of `messages / 10` (10 to 1000) round
/// trips. The echoed bytes are checked.
///
/// # Errors
/// [`Error::InvalidBench`] for `messages == 0`, `size == 0` or `size >` [`MAX_BENCH_MESSAGE`];
/// in redirect mode, whatever [`EbpfSidecar::load_required`] returns; [`Error::Io`] if a socket
/// fails or an echo differs.
pub fn bench_pingpong(mode: BenchMode, messages: usize, size: usize) -> Result<BenchReport> {
    if messages == 0 {
        return Err(Error::InvalidBench("messages must be at least 1"));
    }
    if size == 0 || size > MAX_BENCH_MESSAGE {
        return Err(Error::InvalidBench("size must be between 1 and 65536 bytes"));
    }
    let io_error = |what: &'static str| move |source| Error::Io { what, source };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_error("bind"))?;
    let port = listener.local_addr().map_err(io_error("local_addr"))?.port();
    let mut sidecar = match mode {
        BenchMode::Plain => None,
        BenchMode::Redirect => Some(EbpfSidecar::load_required(&default_cgroup_path(), &[port])?),
    };
    let mut host = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(io_error("connect"))?;
    let (gateway, peer) = listener.accept().map_err(io_error("accept"))?;
    host.set_nodelay(true).map_err(io_error("set_nodelay"))?;
    gateway.set_nodelay(true).map_err(io_error("set_nodelay"))?;
    let function = FunctionId::new(1).ok_or(Error::InvalidBench("function id"))?;
    if let Some(sidecar) = sidecar.as_mut() {
        let local = gateway.local_addr().map_err(io_error("local_addr"))?;
        sidecar.register_connection(ConnectionTuple::from_gateway_socket(local, peer)?, function)?;
    }

    let warmup = (messages / 10).clamp(10, 1000);
    let total = warmup + messages;
    let echo = thread::spawn(move || echo(gateway, size, total));
    let timed = ping(&mut host, size, warmup, messages);
    drop(host); // unblocks the echo thread if `ping` stopped early
    let echoed =
        echo.join().map_err(|_| Error::Io { what: "echo thread", source: io::Error::other("panicked") })?;
    let (mut latencies, elapsed_ns) = timed.map_err(io_error("ping"))?;
    echoed.map_err(io_error("echo"))?;

    let redirected = match sidecar.as_ref() {
        Some(sidecar) => sidecar.function_counters(function)?.total().redirected,
        None => 0,
    };
    latencies.sort_unstable();
    Ok(BenchReport {
        mode,
        messages,
        size,
        p50_ns: percentile(&latencies, 50),
        p99_ns: percentile(&latencies, 99),
        messages_per_sec: messages as f64 * 1e9 / elapsed_ns.max(1) as f64,
        redirected,
    })
}

/// The host side: `warmup + messages` round trips; returns the latencies of the last
/// `messages` and their total time, in nanoseconds.
fn ping(host: &mut TcpStream, size: usize, warmup: usize, messages: usize) -> io::Result<(Vec<u64>, u64)> {
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut latencies = Vec::with_capacity(messages);
    let mut started = Instant::now();
    for i in 0..warmup + messages {
        if i == warmup {
            started = Instant::now();
        }
        out.fill((i % 251) as u8);
        let t0 = Instant::now();
        host.write_all(&out)?;
        host.read_exact(&mut back)?;
        let rtt = t0.elapsed();
        if back != out {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs from the message"));
        }
        if i >= warmup {
            latencies.push(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    Ok((latencies, elapsed))
}

/// The gateway side: echoes `count` messages of `size` bytes, one write each.
fn echo(mut gateway: TcpStream, size: usize, count: usize) -> io::Result<()> {
    let mut buf = vec![0u8; size];
    for _ in 0..count {
        gateway.read_exact(&mut buf)?;
        gateway.write_all(&buf)?;
    }
    Ok(())
}

/// Nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (pct * sorted.len()).div_ceil(100).max(1);
    sorted[(rank - 1).min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[1, 2], 50), 1);
        assert_eq!(percentile(&[], 50), 0);
    }

    #[test]
    fn plain_pingpong_runs_and_refuses_bad_arguments() {
        let report = bench_pingpong(BenchMode::Plain, 200, 96).unwrap();
        assert_eq!((report.messages, report.size, report.redirected), (200, 96, 0));
        assert!(report.p50_ns > 0 && report.p50_ns <= report.p99_ns);
        assert!(report.messages_per_sec > 0.0);
        for (messages, size) in [(0, 96), (10, 0), (10, MAX_BENCH_MESSAGE + 1)] {
            let err = bench_pingpong(BenchMode::Plain, messages, size).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidConfig);
        }
    }
}
