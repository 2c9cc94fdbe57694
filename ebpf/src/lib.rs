//! Shoal's eBPF sidecar (DESIGN.md §7): the fast path for descriptors between a node's gateway
//! and its function hosts, and the per-function message counters the autoscaler reads.
//!
//! Descriptor channels are loopback TCP connections to the gateway's descriptor port(s). With
//! the sidecar loaded:
//!
//! - a `sock_ops` program on a cgroup v2 directory puts every IPv4 TCP socket that connects to
//!   or was accepted on a descriptor port into a `SOCKHASH` keyed by its 4-tuple
//!   ([`SockKey`]), when it reaches ESTABLISHED (both the active and the passive end);
//! - an `SK_MSG` program on that SOCKHASH runs on each `sendmsg` of those sockets: it counts the
//!   message for the connection's function ([`FunctionCounters`], per direction, per CPU) and,
//!   if the connection is registered ([`EbpfSidecar::register_connection`]) and redirect is on
//!   ([`EbpfSidecar::set_redirect`], the kill switch), moves the bytes straight into the peer
//!   socket's receive queue (`bpf_msg_redirect_hash(..., BPF_F_INGRESS)`), skipping TCP/IP. In
//!   every other case it returns `SK_PASS`: the normal TCP path, same bytes.
//!
//! Without the sidecar (or with `--ebpf off`) the same sockets work unredirected; nothing in the
//! descriptor protocol changes. Function hosts need no privileges either way.
//!
//! # Byte order of a stream across paths
//!
//! A reader drains redirected bytes before bytes still queued by TCP. So a stream stays in order
//! only if it never goes TCP → redirect while TCP bytes are unread. The programs guarantee it
//! for the kill switch: a direction that sent through TCP while registered is pinned to TCP for
//! the rest of the connection ([`Registration`]); redirect → TCP is always safe. Callers
//! guarantee it at registration: register while the connection is quiet (e.g. after reading the
//! host's hello, before replying), and only once per connection.
//!
//! # Shutdown
//!
//! Dropping the [`EbpfSidecar`] returns every socket to plain TCP, but bytes redirected into a
//! socket and not yet read when it leaves the SOCKHASH are discarded by the kernel (seen on
//! 6.18). Drop it after descriptor connections are drained or closed; on a live node use the
//! kill switch instead, which loses nothing.
//!
//! # Requirements
//!
//! - **Kernel**: SK_MSG 4.17, SOCKHASH and `bpf_msg_redirect_hash` 4.18, sock_ops 4.13, the
//!   `sk_msg_md` fields used (addresses, ports, `size`) 5.0 — so 5.0 in all — and cgroup v2 for
//!   sock_ops; **5.10 or later recommended** (Calico's floor for
//!   its sockmap path is 4.20, Merbridge's 5.7). Tested on 6.18. Kernels before 5.11 also charge
//!   maps to `RLIMIT_MEMLOCK`, which this crate does not raise.
//! - **Privileges**: `CAP_BPF` + `CAP_NET_ADMIN` (or root; before 5.8, `CAP_SYS_ADMIN`), in the
//!   gateway only. bpffs is not needed (nothing is pinned).
//! - **cgroup v2** mounted; hybrid hosts have it at `/sys/fs/cgroup/unified`
//!   ([`default_cgroup_path`]). The sockets must be created by processes in that cgroup or below.
//! - **IPv4** descriptor sockets: IPv6 (IPv4-mapped included) is passed through untouched.
//!
//! # Modules
//!
//! - [`error`]: [`Error`], its [`ErrorKind`], and the diagnosis of kernel refusals.
//! - `mode`: [`EbpfMode`], the `off|auto|required` switch.
//! - `key`: [`SockKey`] (the 4-tuple layout shared with the C program) and
//!   [`ConnectionTuple`] (a connection as the gateway sees it).
//! - `counters`: [`FunctionId`], [`Counters`], [`FunctionCounters`], [`CounterSnapshot`]
//!   and the decoding of the per-CPU map.
//! - `sidecar`: [`EbpfSidecar`], load/attach/detach and the map operations.
//! - `bench`: [`bench_pingpong`], descriptor round trips with and without redirect.
//!
//! The programs are in `bpf/shoal.bpf.c`; `build-bpf.sh` rebuilds the committed object
//! `bpf/shoal.bpf.o`, which this crate embeds.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bench;
mod counters;
pub mod error;
mod key;
mod mode;
mod sidecar;

pub use bench::{bench_pingpong, BenchMode, BenchReport, MAX_BENCH_MESSAGE};
pub use counters::{CounterSnapshot, Counters, Direction, FunctionCounters, FunctionId};
pub use error::{Error, ErrorKind, Result};
pub use key::{ConnectionTuple, SockKey};
pub use mode::{EbpfMode, ParseEbpfModeError};
pub use sidecar::{default_cgroup_path, EbpfSidecar, Registration, MAX_DESCRIPTOR_PORTS};
