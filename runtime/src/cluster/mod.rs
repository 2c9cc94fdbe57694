//! The aggregation hierarchy across nodes (DESIGN.md §5, §7): membership and top leases
//! ([`lease`]), every node's leaf ([`leaf`]), the coordinate-sharded exchange of whole-cohort
//! strategies ([`exchange`]), the two-phase protocol of RFFL and Bristle ([`twophase`]), the
//! rebasing of stale updates' running statistics ([`statistics`]) and the job's top ([`top`]).

pub mod exchange;
pub mod leaf;
pub mod lease;
pub mod statistics;
pub mod top;
pub mod twophase;
