//! Descriptor round trips with and without SK_MSG redirect, in one run, alternating the modes
//! so that both see the same machine state. Needs CAP_BPF + CAP_NET_ADMIN and cgroup v2.
//!
//! ```text
//! cargo run --release -p shoal-ebpf --example pingpong -- [MESSAGES] [SIZE] [ROUNDS]
//! ```
//! (defaults: 20000 messages of 96 bytes, 3 rounds per mode).

use std::error::Error;

use shoal_ebpf::{bench_pingpong, BenchMode, BenchReport};

fn arg(n: usize, default: usize) -> Result<usize, Box<dyn Error>> {
    Ok(std::env::args().nth(n).map(|s| s.parse()).transpose()?.unwrap_or(default))
}

fn main() -> Result<(), Box<dyn Error>> {
    let (messages, size, rounds) = (arg(1, 20_000)?, arg(2, 96)?, arg(3, 3)?);
    let mut plain = Vec::new();
    let mut redirect = Vec::new();
    for round in 1..=rounds {
        for mode in [BenchMode::Plain, BenchMode::Redirect] {
            let report = bench_pingpong(mode, messages, size)?;
            println!(
                "round {round} {:<8} p50 {:>6} ns  p99 {:>7} ns  {:>9.0} round trips/s  redirected {}",
                mode.as_str(),
                report.p50_ns,
                report.p99_ns,
                report.messages_per_sec,
                report.redirected
            );
            match mode {
                BenchMode::Plain => plain.push(report),
                BenchMode::Redirect => redirect.push(report),
            }
        }
    }
    let median = |reports: &[BenchReport], f: fn(&BenchReport) -> f64| {
        let mut v: Vec<f64> = reports.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let ratio = |f: fn(&BenchReport) -> f64| median(&redirect, f) / median(&plain, f);
    println!(
        "redirect/plain (median of {rounds}): p50 {:.2}x  p99 {:.2}x  round trips/s {:.2}x",
        ratio(|r| r.p50_ns as f64),
        ratio(|r| r.p99_ns as f64),
        ratio(|r| r.messages_per_sec)
    );
    Ok(())
}
