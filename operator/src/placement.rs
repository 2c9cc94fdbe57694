//! Placement: per-node demand (in hosts) → hosts per node (reference/kubernetes.md R1.4).
//!
//! Demand is counted in hosts: a node's arrival rate divided by the planned rate per host (see
//! [`crate::autoscaler`]). R1.4 states the bins in updates/s (`maxHostsPerNode ×
//! updatesPerSecondPerHost`); dividing both sides by the per-host rate gives the same packing
//! with integer items and bins of `maxHostsPerNode` hosts.
//!
//! - **Fit strategies** (`bestFit`, `firstFit`, `worstFit`) obey the hard locality constraint:
//!   spilled hosts go only to nodes with staged updates. Each node first takes its own demand
//!   up to the cap (the autoscaler gives a node without staged updates a demand only to keep
//!   hosts that already run there, or for `minHosts`, so a pool never moves just because a node
//!   went quiet). Overflow (demand above the cap) is handled node by node, largest overflow first
//!   (the "decreasing" of best-fit decreasing, ties by name): overflow hosts already running on
//!   another staged node with room stay there (R1.5 reuse: no cold start), and each remaining
//!   host goes to the staged node with the least residual capacity (`bestFit`, R1.4), the first
//!   by name with room (`firstFit`) or the most residual capacity (`worstFit`). Overflow that no
//!   staged node can take is reported as `unplaced`.
//! - **`roundRobin`** is LIFL's public behaviour (flame's deployer hands each new worker to the
//!   next compute node in turn). It keeps the hosts where they are, adds new ones to the
//!   cluster's nodes in name order after the last node that got one (any node with room,
//!   staged or not), and removes from the most recently used nodes first (LIFO).
//!
//! Every function here is pure and deterministic: ties break on [`NodeName`] order.

use std::collections::{BTreeMap, BTreeSet};

use crate::node::NodeName;
use crate::policy::PlacementStrategy;

/// The input of [`place`].
#[derive(Debug, Clone, Copy)]
pub struct PlacementInput<'a> {
    /// Hosts wanted per node (the autoscaler's per-node share of its total).
    pub demand: &'a BTreeMap<NodeName, u32>,
    /// Nodes holding staged updates of the job (the only nodes fit strategies use).
    pub staged: &'a BTreeSet<NodeName>,
    /// Every node of the cluster that runs a gateway (round-robin's rotation).
    pub cluster: &'a BTreeSet<NodeName>,
    /// Hosts per node now (kept where possible).
    pub current: &'a BTreeMap<NodeName, u32>,
    /// The per-node cap (`maxHostsPerNode`).
    pub max_per_node: u32,
    /// The strategy.
    pub strategy: PlacementStrategy,
}

/// The output of [`place`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// Hosts per node (nodes with zero hosts left out).
    pub hosts: BTreeMap<NodeName, u32>,
    /// Hosts of the demand that found no node with room.
    pub unplaced: u32,
}

/// Round-robin's position: the node that got the last host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundRobinCursor {
    last: Option<NodeName>,
}

/// Places `input.demand`; the sum of hosts plus `unplaced` equals the sum of the demand.
pub fn place(input: &PlacementInput<'_>, cursor: &mut RoundRobinCursor) -> Placement {
    match input.strategy {
        PlacementStrategy::RoundRobin => round_robin(input, cursor),
        strategy => fit(input, strategy),
    }
}

fn fit(input: &PlacementInput<'_>, strategy: PlacementStrategy) -> Placement {
    let cap = input.max_per_node;
    let mut hosts: BTreeMap<NodeName, u32> = BTreeMap::new();
    let mut overflow: Vec<(&NodeName, u32)> = Vec::new();
    let mut unplaced = 0;
    for (node, &want) in input.demand {
        if want == 0 {
            continue;
        }
        let local = want.min(cap);
        hosts.insert(node.clone(), local);
        if want > local {
            overflow.push((node, want - local));
        }
    }
    overflow.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    // Residual capacity of staged nodes after their own demand.
    let mut residual: BTreeMap<&NodeName, u32> =
        input.staged.iter().map(|n| (n, cap - hosts.get(n).copied().unwrap_or(0))).collect();
    // Overflow hosts already running (current above the node's own demand) are kept first.
    let mut reusable: BTreeMap<&NodeName, u32> = input
        .staged
        .iter()
        .map(|n| {
            (n, input.current.get(n).copied().unwrap_or(0).saturating_sub(hosts.get(n).copied().unwrap_or(0)))
        })
        .filter(|(_, spare)| *spare > 0)
        .collect();
    for (source, mut amount) in overflow {
        for (node, spare) in reusable.iter_mut() {
            let room = residual.get(node).copied().unwrap_or(0);
            let take = amount.min(*spare).min(room);
            if take > 0 && *node != source {
                *spare -= take;
                amount -= take;
                *residual.entry(node).or_default() -= take;
                *hosts.entry((*node).clone()).or_default() += take;
            }
        }
        for _ in 0..amount {
            let Some(node) = choose_bin(&residual, source, strategy) else {
                unplaced += 1;
                continue;
            };
            *residual.entry(node).or_default() -= 1;
            *hosts.entry(node.clone()).or_default() += 1;
        }
    }
    hosts.retain(|_, h| *h > 0);
    Placement { hosts, unplaced }
}

/// The staged node (other than `source`) a spilled host goes to.
fn choose_bin<'a>(
    residual: &BTreeMap<&'a NodeName, u32>,
    source: &NodeName,
    strategy: PlacementStrategy,
) -> Option<&'a NodeName> {
    let mut open = residual.iter().filter(|(n, r)| **r > 0 && **n != source);
    let chosen = match strategy {
        // min_by_key/max_by_key keep the first/last of equal keys; name order breaks ties
        // towards the smaller name in both cases.
        PlacementStrategy::BestFit => open.min_by_key(|(_, r)| **r),
        PlacementStrategy::WorstFit => open.min_by_key(|(_, r)| std::cmp::Reverse(**r)),
        _ => open.next(),
    };
    chosen.map(|(n, _)| *n)
}

fn round_robin(input: &PlacementInput<'_>, cursor: &mut RoundRobinCursor) -> Placement {
    let cap = input.max_per_node;
    let want: u32 = input.demand.values().sum();
    let ring: Vec<&NodeName> = input.cluster.iter().collect();
    let mut hosts: BTreeMap<NodeName, u32> = input
        .current
        .iter()
        .filter(|(n, h)| **h > 0 && input.cluster.contains(*n))
        .map(|(n, h)| (n.clone(), (*h).min(cap)))
        .collect();
    let have: u32 = hosts.values().sum();
    let mut unplaced = 0;
    if ring.is_empty() {
        return Placement { hosts: BTreeMap::new(), unplaced: want };
    }
    // Index of the first node after the cursor.
    let after = |last: &Option<NodeName>| match last {
        Some(last) => ring.iter().position(|n| *n > last).unwrap_or(0),
        None => 0,
    };
    if want > have {
        for _ in 0..want - have {
            let start = after(&cursor.last);
            let slot = (0..ring.len())
                .map(|k| ring[(start + k) % ring.len()])
                .find(|n| hosts.get(*n).copied().unwrap_or(0) < cap);
            match slot {
                Some(node) => {
                    *hosts.entry(node.clone()).or_default() += 1;
                    cursor.last = Some(node.clone());
                }
                None => unplaced += 1,
            }
        }
    } else {
        for _ in 0..have - want {
            // Walk backwards from the cursor (inclusive) to the most recently used node.
            let start = (after(&cursor.last) + ring.len() - 1) % ring.len();
            let Some(node) = (0..ring.len())
                .map(|k| ring[(start + ring.len() - k) % ring.len()])
                .find(|n| hosts.get(*n).copied().unwrap_or(0) > 0)
            else {
                break;
            };
            *hosts.entry(node.clone()).or_default() -= 1;
            let idx = ring.iter().position(|n| *n == node).unwrap_or(0);
            cursor.last = Some(ring[(idx + ring.len() - 1) % ring.len()].clone());
        }
    }
    hosts.retain(|_, h| *h > 0);
    Placement { hosts, unplaced }
}

/// Best-fit-decreasing packing of fractional per-node demand (in hosts) into whole hosts, with
/// locality as the hard constraint except for small remainders (R1.4, LIFL's framing):
///
/// 1. every node with demand needs a leaf: a node with `0 < d < 1` gets one host (its spare
///    `1 - d` is capacity others may spill into); a node with `d ≥ 1` gets `⌊d⌋` hosts of its own;
/// 2. the fractional remainders `d - ⌊d⌋` of the nodes with `d ≥ 1`, largest first (ties by
///    name), go into the host with the least spare capacity that still fits them (best fit; a
///    spill, folded across nodes), or, when none fits, open one more host on their own node
///    (whose spare is then offered to the smaller remainders).
///
/// Returns hosts per node (nodes without demand left out) and the demand spilled across nodes,
/// in hosts. Demand within `1e-9` of a whole number counts as whole.
pub fn pack_demand(demand: &BTreeMap<NodeName, f64>) -> (BTreeMap<NodeName, u32>, f64) {
    const EPS: f64 = 1e-9;
    let mut hosts: BTreeMap<NodeName, u32> = BTreeMap::new();
    let mut spare: BTreeMap<NodeName, f64> = BTreeMap::new();
    let mut remainders: Vec<(f64, &NodeName)> = Vec::new();
    for (node, &d) in demand {
        if !d.is_finite() || d <= EPS {
            continue;
        }
        let whole = (d + EPS).floor();
        if whole < 1.0 {
            hosts.insert(node.clone(), 1);
            spare.insert(node.clone(), 1.0 - d);
            continue;
        }
        hosts.insert(node.clone(), whole.min(f64::from(u32::MAX)) as u32);
        let rest = d - whole;
        if rest > EPS {
            remainders.push((rest, node));
        }
    }
    remainders.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    let mut spilled = 0.0;
    for (rest, node) in remainders {
        let best = spare
            .iter()
            .filter(|(m, s)| *m != node && **s + EPS >= rest)
            .min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(b.0)))
            .map(|(m, _)| m.clone());
        match best {
            Some(m) => {
                *spare.entry(m).or_default() -= rest;
                spilled += rest;
            }
            None => {
                *hosts.entry(node.clone()).or_default() += 1;
                *spare.entry(node.clone()).or_default() += 1.0 - rest;
            }
        }
    }
    (hosts, spilled)
}

/// Splits `total` hosts over nodes in proportion to `weights` by the largest-remainder method
/// (ties: larger weight, then name). Exact: the result sums to `total` whenever some weight is
/// positive, and never gives a node more than `⌈total × w / Σw⌉`.
pub fn apportion(total: u32, weights: &BTreeMap<NodeName, u32>) -> BTreeMap<NodeName, u32> {
    let sum: u64 = weights.values().map(|w| u64::from(*w)).sum();
    let mut out: BTreeMap<NodeName, u32> = weights.keys().map(|n| (n.clone(), 0)).collect();
    if sum == 0 || total == 0 {
        return out;
    }
    let mut remainders: Vec<(u64, u32, &NodeName)> = Vec::with_capacity(weights.len());
    let mut given: u64 = 0;
    for (node, w) in weights {
        let exact = u64::from(total) * u64::from(*w);
        let share = exact / sum;
        given += share;
        out.insert(node.clone(), share as u32);
        remainders.push((exact % sum, *w, node));
    }
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
    for (_, _, node) in remainders.into_iter().take((u64::from(total) - given) as usize) {
        *out.entry(node.clone()).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests;
