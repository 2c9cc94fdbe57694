use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn n(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

fn bytes(entries: &[(&str, u64)]) -> BTreeMap<NodeName, u64> {
    entries.iter().map(|(k, v)| (n(k), *v)).collect()
}

#[test]
fn five_leaves_fan_in_two() {
    // Leaves a..e with 5, 1, 4, 2, 3 bytes; f has none and gets no leaf.
    // Level 1: ⌈5/2⌉ = 3 groups; heads a (5), c (4), e (3); then d (2) joins a's group and b (1)
    // c's → {a, d} on a, {b, c} on c, {e} on e; bytes 7, 5, 3.
    // Level 2: ⌈3/2⌉ = 2 groups; heads a (7), c (5); e (3) joins a's → {a, e} on a (10), {c} (5).
    // Level 3: one group {a, c} on a: the top. Depth 3 = ⌈log2 5⌉.
    // Cross-node bytes: level 1 sends d 2 + b 1, level 2 sends e 3, level 3 sends c 5 → 11.
    let plan =
        plan_hierarchy(&bytes(&[("a", 5), ("b", 1), ("c", 4), ("d", 2), ("e", 3), ("f", 0)]), 2).unwrap();
    assert_eq!(plan.depth(), 3);
    let nodes =
        |level: usize| plan.levels[level].iter().map(|a| a.node.as_str().to_owned()).collect::<Vec<_>>();
    assert_eq!(nodes(0), ["a", "b", "c", "d", "e"]);
    assert_eq!(nodes(1), ["a", "c", "e"]);
    assert_eq!(plan.levels[1][0].children, vec![0, 3]);
    assert_eq!(plan.levels[1][1].children, vec![1, 2]);
    assert_eq!(nodes(2), ["a", "c"]);
    assert_eq!(nodes(3), ["a"]);
    assert_eq!(plan.top().unwrap().tier, Tier::Top);
    assert_eq!(plan.top().unwrap().partial_bytes, 15);
    assert_eq!(plan.cross_node_bytes(), 11);
}

#[test]
fn one_leaf_is_its_own_top_and_no_leaf_no_plan() {
    let plan = plan_hierarchy(&bytes(&[("a", 9)]), 4).unwrap();
    assert_eq!(plan.depth(), 0);
    assert_eq!(plan.top().unwrap().node, n("a"));
    let empty = plan_hierarchy(&bytes(&[("a", 0)]), 4).unwrap();
    assert!(empty.top().is_none());
    assert_eq!(
        plan_hierarchy(&bytes(&[("a", 1)]), 1).unwrap_err().kind(),
        crate::ErrorKind::InvalidParameter
    );
}

/// ⌈log_f L⌉ by repeated multiplication (an oracle independent of the planner's loop).
fn ceil_log(fan_in: u64, leaves: u64) -> usize {
    let mut reach = 1u64;
    let mut depth = 0;
    while reach < leaves {
        reach *= fan_in;
        depth += 1;
    }
    depth
}

proptest! {
    #[test]
    fn plan_properties(
        staged in proptest::collection::vec(0u64..1_000, 1..60),
        fan_in in 2u32..9,
    ) {
        let input: BTreeMap<NodeName, u64> =
            staged.iter().enumerate().map(|(i, b)| (n(&format!("node-{i:02}")), *b)).collect();
        let plan = plan_hierarchy(&input, fan_in).unwrap();
        let leaves = staged.iter().filter(|b| **b > 0).count();
        if leaves == 0 {
            prop_assert!(plan.levels.is_empty());
            return Ok(());
        }
        // No leaf on a node without staged bytes, one leaf per staged node.
        prop_assert_eq!(plan.leaves().len(), leaves);
        for leaf in plan.leaves() {
            prop_assert!(input[&leaf.node] > 0);
        }
        prop_assert_eq!(plan.depth(), ceil_log(u64::from(fan_in), leaves as u64));
        for pair in plan.levels.windows(2) {
            // Every child exactly one parent, no parent above the fan-in, level sizes ⌈n/f⌉.
            let mut parents = vec![0; pair[0].len()];
            for parent in &pair[1] {
                prop_assert!(!parent.children.is_empty() && parent.children.len() <= fan_in as usize);
                for c in &parent.children {
                    parents[*c] += 1;
                }
                // The parent sits on a node of one of its children, the one with most bytes.
                let best = parent.children.iter().map(|c| pair[0][*c].partial_bytes).max().unwrap();
                let on = parent.children.iter().find(|c| pair[0][**c].node == parent.node);
                prop_assert!(on.is_some_and(|c| pair[0][*c].partial_bytes == best));
            }
            prop_assert!(parents.iter().all(|p| *p == 1));
            prop_assert_eq!(pair[1].len(), pair[0].len().div_ceil(fan_in as usize));
        }
        prop_assert_eq!(plan.levels.last().unwrap().len(), 1);
        // Total bytes preserved to the top; deterministic.
        prop_assert_eq!(plan.top().unwrap().partial_bytes, staged.iter().sum::<u64>());
        prop_assert_eq!(plan_hierarchy(&input, fan_in).unwrap(), plan);
    }
}
