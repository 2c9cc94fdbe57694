use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn n(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

fn map(entries: &[(&str, u32)]) -> BTreeMap<NodeName, u32> {
    entries.iter().map(|(k, v)| (n(k), *v)).collect()
}

fn set(names: &[&str]) -> BTreeSet<NodeName> {
    names.iter().map(|k| n(k)).collect()
}

fn run(
    strategy: PlacementStrategy,
    demand: &[(&str, u32)],
    staged: &[&str],
    current: &[(&str, u32)],
    cap: u32,
) -> Placement {
    let demand = map(demand);
    let staged = set(staged);
    let cluster: BTreeSet<NodeName> = ["a", "b", "c", "d"].iter().map(|k| n(k)).collect();
    let current = map(current);
    let input = PlacementInput {
        demand: &demand,
        staged: &staged,
        cluster: &cluster,
        current: &current,
        max_per_node: cap,
        strategy,
    };
    place(&input, &mut RoundRobinCursor::default())
}

#[test]
fn fit_strategies_differ_only_in_where_overflow_goes() {
    // Cap 4. Demand a 7 (overflow 3), b 1, c 3, d 0 (staged). Residual after own demand:
    // b 3, c 1, d 4. Best fit fills the least residual first: c (1), then b (3) → c+1, b+2.
    // First fit takes names in order: b (3) → b+3. Worst fit, one host at a time to the most
    // residual: d (4 → 3), then b and d tie at 3 → b (name; 3 → 2), then d (3 → 2) → b+1, d+2.
    let demand = [("a", 7), ("b", 1), ("c", 3), ("d", 0)];
    let staged = ["a", "b", "c", "d"];
    let best = run(PlacementStrategy::BestFit, &demand, &staged, &[], 4);
    assert_eq!(best.hosts, map(&[("a", 4), ("b", 3), ("c", 4)]));
    let first = run(PlacementStrategy::FirstFit, &demand, &staged, &[], 4);
    assert_eq!(first.hosts, map(&[("a", 4), ("b", 4), ("c", 3)]));
    let worst = run(PlacementStrategy::WorstFit, &demand, &staged, &[], 4);
    assert_eq!(worst.hosts, map(&[("a", 4), ("b", 2), ("c", 3), ("d", 2)]));
    for p in [best, first, worst] {
        assert_eq!(p.unplaced, 0);
    }
}

#[test]
fn overflow_goes_only_to_staged_nodes() {
    // d has room but no staged updates; b is staged with room for 1 of a's 3 overflow hosts.
    let p = run(PlacementStrategy::WorstFit, &[("a", 7), ("b", 3)], &["a", "b"], &[], 4);
    assert_eq!(p.hosts, map(&[("a", 4), ("b", 4)]));
    assert_eq!(p.unplaced, 2);
}

#[test]
fn running_overflow_hosts_stay_where_they_are() {
    // a overflows by 2; c (staged) already runs 2 hosts beyond its own demand of 1, so best fit
    // keeps them there instead of moving them to b (least residual), avoiding two cold starts.
    let p =
        run(PlacementStrategy::BestFit, &[("a", 6), ("b", 3), ("c", 1)], &["a", "b", "c"], &[("c", 3)], 4);
    assert_eq!(p.hosts, map(&[("a", 4), ("b", 3), ("c", 3)]));
}

#[test]
fn round_robin_deals_in_turn_and_removes_last_in_first_out() {
    let demand_at = |k: u32| map(&[("d", k)]);
    let staged = set(&["d"]);
    let cluster = set(&["a", "b", "c", "d"]);
    let mut cursor = RoundRobinCursor::default();
    let mut current = BTreeMap::new();
    let mut step = |k: u32, current: &mut BTreeMap<NodeName, u32>| {
        let demand = demand_at(k);
        let input = PlacementInput {
            demand: &demand,
            staged: &staged,
            cluster: &cluster,
            current,
            max_per_node: 1,
            strategy: PlacementStrategy::RoundRobin,
        };
        let p = place(&input, &mut cursor);
        *current = p.hosts.clone();
        p
    };
    // 2 hosts: a, b. Then 3: + c. Then 1: remove c, then b. Then 2: add b again.
    assert_eq!(step(2, &mut current).hosts, map(&[("a", 1), ("b", 1)]));
    assert_eq!(step(3, &mut current).hosts, map(&[("a", 1), ("b", 1), ("c", 1)]));
    assert_eq!(step(1, &mut current).hosts, map(&[("a", 1)]));
    assert_eq!(step(2, &mut current).hosts, map(&[("a", 1), ("b", 1)]));
    // 5 hosts with a cap of 1 on 4 nodes: one unplaced.
    let p = step(5, &mut current);
    assert_eq!((p.hosts.len(), p.unplaced), (4, 1));
}

#[test]
fn apportion_by_largest_remainder() {
    // 10 over 1 : 2 : 4 (sum 7): exact 10/7 = 1.43, 20/7 = 2.86, 40/7 = 5.71 → floors 1, 2, 5
    // (8), remainders 3, 6, 5 (in sevenths) → b then c get the 2 left → 1, 3, 6.
    let w = map(&[("a", 1), ("b", 2), ("c", 4)]);
    assert_eq!(apportion(10, &w), map(&[("a", 1), ("b", 3), ("c", 6)]));
    assert_eq!(apportion(0, &w), map(&[("a", 0), ("b", 0), ("c", 0)]));
    assert_eq!(apportion(3, &map(&[("a", 0)])), map(&[("a", 0)]));
}

fn arb_case(
) -> impl Strategy<Value = (BTreeMap<NodeName, u32>, BTreeSet<NodeName>, BTreeMap<NodeName, u32>, u32)> {
    let names: Vec<NodeName> = (0..8).map(|i| n(&format!("node-{i}"))).collect();
    (
        proptest::collection::vec(0u32..12, 8),
        proptest::collection::vec(any::<bool>(), 8),
        proptest::collection::vec(0u32..6, 8),
        1u32..6,
    )
        .prop_map(move |(demand, staged, current, cap)| {
            let demand: BTreeMap<NodeName, u32> = names.iter().cloned().zip(demand).collect();
            // A node with demand holds staged updates (the autoscaler only asks for hosts there
            // or where hosts already run); others may or may not.
            let staged: BTreeSet<NodeName> = names
                .iter()
                .zip(staged)
                .filter(|(k, s)| *s || demand[*k] > 0)
                .map(|(k, _)| k.clone())
                .collect();
            let current: BTreeMap<NodeName, u32> =
                names.iter().cloned().zip(current.into_iter().map(|c| c.min(cap))).collect();
            (demand, staged, current, cap)
        })
}

proptest! {
    #[test]
    fn placement_never_exceeds_capacity_and_conserves_hosts(
        (demand, staged, current, cap) in arb_case(),
        strategy in proptest::sample::select(PlacementStrategy::ALL.to_vec()),
    ) {
        let cluster: BTreeSet<NodeName> = demand.keys().cloned().collect();
        let input = PlacementInput { demand: &demand, staged: &staged, cluster: &cluster, current: &current, max_per_node: cap, strategy };
        let p = place(&input, &mut RoundRobinCursor::default());
        let want: u32 = demand.values().sum();
        let placed: u32 = p.hosts.values().sum();
        prop_assert_eq!(placed + p.unplaced, want);
        for (node, hosts) in &p.hosts {
            prop_assert!(*hosts <= cap, "{} has {} > cap {}", node, hosts, cap);
        }
        if strategy != PlacementStrategy::RoundRobin {
            for (node, hosts) in &p.hosts {
                // Locality: hosts only on staged nodes or where the node's own demand asks.
                prop_assert!(staged.contains(node) || demand[node] >= *hosts);
                // Each node's own demand is served locally first.
                prop_assert!(*hosts >= demand[node].min(cap));
            }
            // Nothing unplaced while a staged node has room.
            if p.unplaced > 0 {
                for node in &staged {
                    prop_assert_eq!(p.hosts.get(node).copied().unwrap_or(0), cap);
                }
            }
        }
        // Deterministic.
        let again = place(&input, &mut RoundRobinCursor::default());
        prop_assert_eq!(again, p);
    }

    #[test]
    fn apportion_sums_to_the_total_and_stays_proportional(
        weights in proptest::collection::vec(0u32..50, 1..10),
        total in 0u32..200,
    ) {
        let w: BTreeMap<NodeName, u32> = weights.iter().enumerate().map(|(i, v)| (n(&format!("n{i}")), *v)).collect();
        let out = apportion(total, &w);
        let sum: u64 = weights.iter().map(|v| u64::from(*v)).sum();
        let got: u32 = out.values().sum();
        prop_assert_eq!(got, if sum == 0 { 0 } else { total });
        if sum > 0 {
            for (node, share) in &out {
                let exact = f64::from(total) * f64::from(w[node]) / sum as f64;
                prop_assert!(f64::from(*share) >= exact.floor() && f64::from(*share) <= exact.ceil());
            }
        }
    }
}

/// Best-fit-decreasing by hand. Demand (hosts): a 2.7, b 1.2, c 0.3, d 1.05, e 0.
/// Step 1: a 2, b 1, c 1 (a leaf, spare 0.7), d 1; e none. Remainders: a 0.7, b 0.2, d 0.05.
/// Step 2: a's 0.7 fits c's spare 0.7 exactly (best and only fit) → spill, c spare 0;
/// b's 0.2 fits nowhere → b opens a host (spare 0.8); d's 0.05 → the least spare that fits is
/// b's 0.8 → spill. Hosts a 2, b 2, c 1, d 1 = 6 (per-node ceilings would be 3+2+1+2 = 8);
/// spilled 0.75 host.
#[test]
fn pack_demand_best_fit_decreasing_by_hand() {
    let demand: BTreeMap<NodeName, f64> = [("a", 2.7), ("b", 1.2), ("c", 0.3), ("d", 1.05), ("e", 0.0)]
        .into_iter()
        .map(|(name, d)| (n(name), d))
        .collect();
    let (hosts, spilled) = pack_demand(&demand);
    let got: Vec<(&str, u32)> = hosts.iter().map(|(n, h)| (n.as_str(), *h)).collect();
    assert_eq!(got, [("a", 2), ("b", 2), ("c", 1), ("d", 1)]);
    assert!((spilled - 0.75).abs() < 1e-9, "{spilled}");
    // Whole demands pack to themselves; sub-host demand still gets its leaf.
    let whole: BTreeMap<NodeName, f64> =
        [("a", 3.0), ("b", 0.1)].into_iter().map(|(name, d)| (n(name), d)).collect();
    let (hosts, spilled) = pack_demand(&whole);
    assert_eq!(hosts.values().copied().collect::<Vec<_>>(), [3, 1]);
    assert_eq!(spilled, 0.0);
}

proptest::proptest! {
    /// Packing never uses more hosts than the per-node ceilings, never fewer than the
    /// aggregate's ceiling or one per node with demand, and spills only remainders.
    #[test]
    fn pack_demand_bounds(demand in proptest::collection::vec(0.0f64..6.0, 1..20)) {
        let map: BTreeMap<NodeName, f64> =
            demand.iter().enumerate().map(|(i, d)| (n(&format!("n{i:02}")), *d)).collect();
        let (hosts, spilled) = pack_demand(&map);
        let total: u32 = hosts.values().sum();
        let ceilings: u32 = demand.iter().map(|d| if *d <= 1e-9 { 0 } else { (d - 1e-9).ceil() as u32 }).sum();
        let sum: f64 = demand.iter().filter(|d| **d > 1e-9).sum();
        let staged = demand.iter().filter(|d| **d > 1e-9).count() as u32;
        proptest::prop_assert!(total <= ceilings);
        proptest::prop_assert!(f64::from(total) + 1e-6 >= sum);
        proptest::prop_assert!(total >= staged);
        let remainders: f64 = demand.iter().filter(|d| **d >= 1.0).map(|d| d - d.floor()).sum();
        proptest::prop_assert!(spilled <= remainders + 1e-9);
    }
}
