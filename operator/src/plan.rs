//! The aggregation hierarchy of one (job, round): leaves, middles and the top, and the node
//! each runs on (reference/kubernetes.md R1.3, DESIGN.md §7).
//!
//! - Leaves: one per node holding staged bytes of the round (a node without staged bytes gets
//!   none).
//! - Levels: level `k` has `⌈n_{k-1} / fanIn⌉` aggregators, until one remains: the top. With
//!   `L` leaves the depth (levels above the leaves) is `⌈log_fanIn L⌉`; a single leaf is its
//!   own top (depth 0).
//! - Grouping: the `g = ⌈n / fanIn⌉` children with the most partial bytes each head one group,
//!   and the rest fill the groups in order (largest first). A group's parent runs on the node
//!   holding the largest share of the group's partial bytes (ties: the smaller node name);
//!   within one level all children run on distinct nodes, so that node is the head's and the
//!   level sends `Σ bytes − Σ group heads` across nodes — the least any grouping with these
//!   group sizes can send.
//! - Partial bytes: the caller gives each leaf's; a middle's are the sum of its children's (an
//!   upper bound: exact for strategies whose partials carry per-client data up the tree, an
//!   overestimate for merged weighted sums, whose partial is one model's size).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::node::NodeName;

/// The tier of an aggregator (DESIGN.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Tier {
    /// Folds the client updates staged on its node.
    Leaf,
    /// Folds partials of the level below.
    Middle,
    /// The job's one committer.
    Top,
}

/// One aggregator of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedAggregator {
    /// Its tier.
    pub tier: Tier,
    /// The node it runs on.
    pub node: NodeName,
    /// Indices of its children in the level below (empty for leaves).
    pub children: Vec<usize>,
    /// Partial bytes it hands to its parent.
    pub partial_bytes: u64,
}

/// The hierarchy of one round: `levels[0]` are the leaves, the last level holds the top.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HierarchyPlan {
    /// The fan-in used.
    pub fan_in: u32,
    /// Aggregators by level; empty when no node holds staged bytes.
    pub levels: Vec<Vec<PlannedAggregator>>,
}

impl HierarchyPlan {
    /// Levels above the leaves (0 for a single leaf, which is then also the top).
    pub fn depth(&self) -> usize {
        self.levels.len().saturating_sub(1)
    }

    /// The leaves.
    pub fn leaves(&self) -> &[PlannedAggregator] {
        self.levels.first().map_or(&[], Vec::as_slice)
    }

    /// The top aggregator, if any node holds staged bytes.
    pub fn top(&self) -> Option<&PlannedAggregator> {
        self.levels.last().and_then(|l| l.first())
    }

    /// Partial bytes that cross nodes on the way up (a child on another node than its parent).
    pub fn cross_node_bytes(&self) -> u64 {
        self.levels
            .windows(2)
            .map(|pair| {
                let (below, above) = (&pair[0], &pair[1]);
                above
                    .iter()
                    .flat_map(|p| p.children.iter().map(move |c| (p, &below[*c])))
                    .filter(|(p, c)| p.node != c.node)
                    .map(|(_, c)| c.partial_bytes)
                    .sum::<u64>()
            })
            .sum()
    }
}

/// Plans the hierarchy of one round from the partial bytes staged per node.
///
/// # Errors
/// [`Error::InvalidParameter`] when `fan_in < 2` (a fan-in of 1 never converges).
pub fn plan_hierarchy(staged_bytes: &BTreeMap<NodeName, u64>, fan_in: u32) -> Result<HierarchyPlan> {
    if fan_in < 2 {
        return Err(Error::InvalidParameter {
            name: "fanIn",
            reason: format!("{fan_in}: must be at least 2"),
        });
    }
    let leaves: Vec<PlannedAggregator> = staged_bytes
        .iter()
        .filter(|(_, b)| **b > 0)
        .map(|(node, bytes)| PlannedAggregator {
            tier: Tier::Leaf,
            node: node.clone(),
            children: Vec::new(),
            partial_bytes: *bytes,
        })
        .collect();
    let mut levels = Vec::new();
    if leaves.is_empty() {
        return Ok(HierarchyPlan { fan_in, levels });
    }
    levels.push(leaves);
    while levels.last().is_some_and(|l| l.len() > 1) {
        let below = levels.last().map_or(&[][..], Vec::as_slice);
        let next = group_level(below, fan_in as usize);
        levels.push(next);
    }
    if let Some(top) = levels.last_mut().and_then(|l| l.first_mut()) {
        top.tier = Tier::Top;
    }
    Ok(HierarchyPlan { fan_in, levels })
}

/// One level up: `⌈n / fan_in⌉` parents, heads = the largest children.
fn group_level(below: &[PlannedAggregator], fan_in: usize) -> Vec<PlannedAggregator> {
    let groups = below.len().div_ceil(fan_in);
    let mut order: Vec<usize> = (0..below.len()).collect();
    order.sort_by(|a, b| {
        below[*b].partial_bytes.cmp(&below[*a].partial_bytes).then(below[*a].node.cmp(&below[*b].node))
    });
    let mut members: Vec<Vec<usize>> = order[..groups].iter().map(|h| vec![*h]).collect();
    let mut g = 0;
    for child in &order[groups..] {
        while members[g].len() >= fan_in {
            g += 1;
        }
        members[g].push(*child);
    }
    members
        .into_iter()
        .map(|mut children| {
            children.sort_unstable();
            let mut by_node: BTreeMap<&NodeName, u64> = BTreeMap::new();
            for c in &children {
                *by_node.entry(&below[*c].node).or_default() += below[*c].partial_bytes;
            }
            // Largest share; on a tie the smaller name (max_by_key keeps the last maximum, so
            // compare reversed names).
            let node = by_node
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map(|(n, _)| (*n).clone())
                .unwrap_or_else(|| below[children[0]].node.clone());
            let partial_bytes = children.iter().map(|c| below[*c].partial_bytes).sum();
            PlannedAggregator { tier: Tier::Middle, node, children, partial_bytes }
        })
        .collect()
}

#[cfg(test)]
mod tests;
