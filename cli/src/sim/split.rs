//! Seeded data splits: a class-stratified train/test split and the per-class
//! Dirichlet(alpha) non-IID partition over federated clients.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use super::Dataset;

/// Smallest Dirichlet concentration [`dirichlet_split`] uses; smaller (or NaN)
/// values are raised to it.
pub const MIN_ALPHA: f64 = 1e-3;
/// Largest Dirichlet concentration [`dirichlet_split`] uses (practically IID);
/// larger values, including `+inf`, are lowered to it.
pub const MAX_ALPHA: f64 = 1e6;
/// How many full Dirichlet draws [`dirichlet_split`] tries before it
/// rebalances the last draw by moving examples from the largest client.
pub const MAX_DIRICHLET_TRIES: usize = 100;

/// Indices `0..labels.len()` grouped by label, ascending label, each group in
/// ascending index order.
fn indices_by_class(labels: &[u8]) -> Vec<Vec<usize>> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); 256];
    for (i, &l) in labels.iter().enumerate() {
        by_class[usize::from(l)].push(i);
    }
    by_class.retain(|c| !c.is_empty());
    by_class
}

/// Splits `ds` into `(train, test)` with the same class proportions in both,
/// deterministically from `seed`.
///
/// For every class, its indices are shuffled with a ChaCha8 generator seeded
/// by `seed` and `round(test_fraction * class_count)` of them go to the test
/// set. Both outputs keep the original row order; together they hold every
/// row of `ds` exactly once. Shapes: `train.features` is `[n - t, 64]`,
/// `test.features` is `[t, 64]` (`f32`), labels `u8`.
///
/// `test_fraction` is clamped to `[0, 1]`; NaN is treated as 0.
pub fn train_test_split(ds: &Dataset, test_fraction: f64, seed: u64) -> (Dataset, Dataset) {
    let frac = if test_fraction.is_nan() { 0.0 } else { test_fraction.clamp(0.0, 1.0) };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut train_idx = Vec::with_capacity(ds.len());
    let mut test_idx = Vec::new();
    for mut class in indices_by_class(&ds.labels) {
        class.shuffle(&mut rng);
        // Exact enough: class sizes are far below 2^52.
        let n_test = ((frac * class.len() as f64).round() as usize).min(class.len());
        test_idx.extend_from_slice(&class[..n_test]);
        train_idx.extend_from_slice(&class[n_test..]);
    }
    train_idx.sort_unstable();
    test_idx.sort_unstable();
    (ds.subset(&train_idx), ds.subset(&test_idx))
}

/// Draws one point of the `k`-dimensional Dirichlet(alpha, ..., alpha)
/// simplex as normalised Gamma(alpha, 1) variates.
///
/// With very small `alpha` every Gamma draw can underflow to zero; the limit
/// of the distribution as alpha -> 0 is a uniformly chosen vertex, which is
/// what is returned then.
fn dirichlet_proportions(alpha: f64, k: usize, rng: &mut impl Rng) -> Vec<f64> {
    let gamma = Gamma::new(alpha, 1.0).expect("alpha is clamped to a finite positive value");
    let mut p: Vec<f64> = (0..k).map(|_| gamma.sample(rng)).collect();
    let sum: f64 = p.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        p.iter_mut().for_each(|v| *v /= sum);
    } else {
        p.iter_mut().for_each(|v| *v = 0.0);
        p[rng.gen_range(0..k)] = 1.0;
    }
    p
}

/// One per-class Dirichlet partition of `by_class` over `k` clients.
fn dirichlet_draw(by_class: &[Vec<usize>], k: usize, alpha: f64, rng: &mut impl Rng) -> Vec<Vec<usize>> {
    let mut clients: Vec<Vec<usize>> = vec![Vec::new(); k];
    for class in by_class {
        let mut idx = class.clone();
        idx.shuffle(rng);
        let p = dirichlet_proportions(alpha, k, rng);
        let n = idx.len();
        let mut start = 0usize;
        let mut cum = 0.0f64;
        for (c, client) in clients.iter_mut().enumerate() {
            let end = if c + 1 == k {
                n
            } else {
                cum += p[c];
                ((cum * n as f64) as usize).clamp(start, n)
            };
            client.extend_from_slice(&idx[start..end]);
            start = end;
        }
    }
    clients
}

/// Partitions the example indices `0..labels.len()` over `num_clients`
/// clients with the classic per-class Dirichlet(alpha) scheme used by the
/// FedML and Flower partitioners, deterministically from `seed`.
///
/// For every class (in ascending label order) the class's indices are
/// shuffled, proportions over the clients are drawn from a symmetric
/// Dirichlet(`alpha`), and the shuffled indices are cut at the cumulative
/// proportions. Small `alpha` (e.g. 0.1) gives strongly skewed label mixes,
/// large `alpha` approaches an IID split. If some client ends up with fewer
/// than `min_per_client` examples, the whole draw is repeated, up to
/// [`MAX_DIRICHLET_TRIES`] times; after that, single examples are moved from
/// the currently largest client to each short client until all reach the
/// minimum.
///
/// Returns `num_clients` vectors of indices (`usize`, each sorted ascending);
/// every index in `0..labels.len()` appears in exactly one of them, and each
/// has at least `min(min_per_client, labels.len() / num_clients)` entries.
///
/// Degenerate inputs never panic: `num_clients == 0` returns an empty vector,
/// `alpha` is clamped to `[MIN_ALPHA, MAX_ALPHA]` (NaN counts as `MIN_ALPHA`),
/// and an unsatisfiable `min_per_client` is lowered to
/// `labels.len() / num_clients`.
pub fn dirichlet_split(
    labels: &[u8],
    num_clients: usize,
    alpha: f64,
    seed: u64,
    min_per_client: usize,
) -> Vec<Vec<usize>> {
    let k = num_clients;
    if k == 0 {
        return Vec::new();
    }
    let alpha = if alpha.is_nan() { MIN_ALPHA } else { alpha.clamp(MIN_ALPHA, MAX_ALPHA) };
    let min_size = min_per_client.min(labels.len() / k);
    let by_class = indices_by_class(labels);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    let mut clients = dirichlet_draw(&by_class, k, alpha, &mut rng);
    let mut tries = 1;
    while tries < MAX_DIRICHLET_TRIES && clients.iter().any(|c| c.len() < min_size) {
        clients = dirichlet_draw(&by_class, k, alpha, &mut rng);
        tries += 1;
    }

    // Rebalance if still short. Because sum(len) = labels.len() >= k * min_size,
    // whenever one client is below min_size the largest one is above it, so
    // every move keeps the donor at or above the minimum and the loop ends.
    while let Some(short) = clients.iter().position(|c| c.len() < min_size) {
        let donor = (0..k).max_by_key(|&c| (clients[c].len(), std::cmp::Reverse(c))).expect("k > 0");
        let pick = rng.gen_range(0..clients[donor].len());
        let moved = clients[donor].swap_remove(pick);
        clients[short].push(moved);
    }

    for c in &mut clients {
        c.sort_unstable();
    }
    clients
}

/// Exponent `a` of the power-law shard sizes of RFFL's `powerlaw` split (scipy
/// `powerlaw(a=1.65911332899)`, whose quantile function is `q^(1/a)`).
pub const POWERLAW_A: f64 = 1.659_113_328_99;

/// RFFL's `powerlaw` split (Xu & Lyu, reference code `Data_Prepper.py`): client `k` of `n`
/// gets a shard proportional to the `k`-th point of `linspace(ppf(0.01), ppf(0.99), n)` of a
/// power law with exponent [`POWERLAW_A`], of randomly drawn examples (seeded). Shard sizes are
/// the scaled proportions rounded up, then trimmed from the largest so that every example is
/// used at most once. Returns `n` disjoint index lists, smallest shard first.
pub fn powerlaw_split(num_examples: usize, num_clients: usize, seed: u64) -> Vec<Vec<usize>> {
    if num_clients == 0 {
        return Vec::new();
    }
    let ppf = |q: f64| q.powf(1.0 / POWERLAW_A);
    let (lo, hi) = (ppf(0.01), ppf(0.99));
    let points: Vec<f64> = (0..num_clients)
        .map(|k| if num_clients == 1 { hi } else { lo + (hi - lo) * k as f64 / (num_clients - 1) as f64 })
        .collect();
    let total: f64 = points.iter().sum();
    let mut sizes: Vec<usize> =
        points.iter().map(|p| (p / total * num_examples as f64).ceil() as usize).collect();
    // Ceil can overshoot by up to one example per client: take them back from the largest.
    let mut excess = sizes.iter().sum::<usize>().saturating_sub(num_examples);
    for s in sizes.iter_mut().rev() {
        let cut = excess.min(s.saturating_sub(1));
        *s -= cut;
        excess -= cut;
    }
    let mut order: Vec<usize> = (0..num_examples).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut out = Vec::with_capacity(num_clients);
    let mut start = 0;
    for s in sizes {
        let end = (start + s).min(order.len());
        out.push(order[start..end].to_vec());
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_partition(parts: &[Vec<usize>], n: usize) {
        let mut seen = vec![0u32; n];
        for p in parts {
            for &i in p {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "not every index appears exactly once");
    }

    #[test]
    fn dirichlet_split_is_a_partition_respecting_the_minimum() {
        let ds = Dataset::digits().expect("embedded data parses");
        for seed in 0..20 {
            for &alpha in &[0.05, 0.5, 5.0] {
                let parts = dirichlet_split(&ds.labels, 20, alpha, seed, 10);
                assert_eq!(parts.len(), 20);
                assert_partition(&parts, ds.len());
                assert!(
                    parts.iter().all(|p| p.len() >= 10),
                    "seed {seed} alpha {alpha}: sizes {:?}",
                    parts.iter().map(Vec::len).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn dirichlet_split_is_deterministic_and_skewed() {
        let ds = Dataset::digits().expect("embedded data parses");
        let a = dirichlet_split(&ds.labels, 20, 0.5, 42, 10);
        let b = dirichlet_split(&ds.labels, 20, 0.5, 42, 10);
        let c = dirichlet_split(&ds.labels, 20, 0.5, 43, 10);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Non-IID: at alpha = 0.5 some client misses at least one class.
        let misses_a_class = a.iter().any(|p| {
            let mut present = [false; Dataset::NUM_CLASSES];
            p.iter().for_each(|&i| present[usize::from(ds.labels[i])] = true);
            present.iter().any(|&x| !x)
        });
        assert!(misses_a_class);
    }

    #[test]
    fn powerlaw_split_sizes_grow_and_cover_disjointly() {
        let parts = powerlaw_split(1438, 10, 3);
        assert_eq!(parts.len(), 10);
        let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "{sizes:?}");
        // ppf(0.01) / ppf(0.99) = (0.01/0.99)^(1/a): the smallest shard is ~6% of the largest.
        let ratio = sizes[0] as f64 / sizes[9] as f64;
        let expected = (0.01f64 / 0.99).powf(1.0 / POWERLAW_A);
        assert!((ratio - expected).abs() < 0.02, "{ratio} vs {expected}");
        assert_eq!(sizes.iter().sum::<usize>(), 1438);
        let mut all: Vec<usize> = parts.concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 1438);
        assert!(powerlaw_split(10, 0, 1).is_empty());
    }

    #[test]
    fn dirichlet_split_handles_degenerate_inputs() {
        let labels: Vec<u8> = (0..30u8).map(|i| i % 3).collect();
        assert!(dirichlet_split(&labels, 0, 0.5, 1, 1).is_empty());
        for &alpha in &[0.0, -1.0, f64::NAN, f64::INFINITY, 1e-300] {
            let parts = dirichlet_split(&labels, 4, alpha, 1, 5);
            assert_partition(&parts, labels.len());
            assert!(parts.iter().all(|p| p.len() >= 5), "alpha {alpha}");
        }
        // Unsatisfiable minimum is lowered to n / k = 3.
        let parts = dirichlet_split(&labels, 10, 0.5, 1, 100);
        assert_partition(&parts, labels.len());
        assert!(parts.iter().all(|p| p.len() == 3));
        // More clients than examples.
        let parts = dirichlet_split(&labels[..2], 5, 0.5, 1, 1);
        assert_eq!(parts.len(), 5);
        assert_partition(&parts, 2);
        assert!(dirichlet_split(&[], 3, 0.5, 1, 1).iter().all(Vec::is_empty));
    }

    #[test]
    fn train_test_split_is_stratified_and_complete() {
        let ds = Dataset::digits().expect("embedded data parses");
        let (train, test) = train_test_split(&ds, 0.2, 7);
        assert_eq!(train.len() + test.len(), ds.len());
        assert!((355..=365).contains(&test.len()), "test size {}", test.len());
        for class in 0..Dataset::NUM_CLASSES as u8 {
            let total = ds.labels.iter().filter(|&&l| l == class).count() as f64;
            let in_test = test.labels.iter().filter(|&&l| l == class).count() as f64;
            assert!((in_test - 0.2 * total).abs() <= 0.5 + 1e-9);
        }
        let (train2, test2) = train_test_split(&ds, 0.2, 7);
        assert_eq!((train, test), (train2, test2));
        let (all, none) = train_test_split(&ds, f64::NAN, 7);
        assert_eq!((all.len(), none.len()), (ds.len(), 0));
        let (none, all) = train_test_split(&ds, 3.0, 7);
        assert_eq!((all.len(), none.len()), (ds.len(), 0));
    }
}
