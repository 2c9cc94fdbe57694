//! Softmax regression (multinomial logistic regression): parameters,
//! mini-batch SGD and evaluation.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use rand::seq::SliceRandom;
use rand::Rng;

use super::{Dataset, Result, SimError};

const C: usize = Dataset::NUM_CLASSES;
const F: usize = Dataset::NUM_FEATURES;

/// Parameters of a softmax-regression classifier over the 64 digit features.
///
/// The logits of an example `x` (`[64]`) are `W x + b`, with `W` the
/// `[10, 64]` matrix stored row-major in `weight` and `b` = `bias`. Kept as
/// flat `Vec<f32>`s so that the server can average, serialize and ship them
/// as plain tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxParams {
    /// Weight matrix `W`, `f32`, row-major shape `[10, 64]` (640 values):
    /// `weight[c * 64 + j]` multiplies feature `j` for class `c`.
    pub weight: Vec<f32>,
    /// Bias vector `b`, `f32`, shape `[10]`: one per class.
    pub bias: Vec<f32>,
}

impl SoftmaxParams {
    /// All-zero parameters: `weight` is 640 zeros (`[10, 64]`), `bias` 10
    /// zeros. Predicts the uniform distribution over the 10 classes.
    pub fn zeros() -> Self {
        SoftmaxParams { weight: vec![0.0; C * F], bias: vec![0.0; C] }
    }

    /// Checks that `weight` has `10 * 64` and `bias` has `10` entries.
    ///
    /// # Errors
    /// [`SimError::Shape`] naming the wrong length.
    pub fn check(&self) -> Result<()> {
        if self.weight.len() != C * F {
            return Err(SimError::Shape(format!(
                "weight has {} values but expected {} ([{C}, {F}])",
                self.weight.len(),
                C * F
            )));
        }
        if self.bias.len() != C {
            return Err(SimError::Shape(format!("bias has {} values but expected {C}", self.bias.len())));
        }
        Ok(())
    }

    /// `(W, b)` as ndarray views, `[10, 64]` and `[10]`; `None` if the
    /// lengths are wrong.
    fn views(&self) -> Option<(ArrayView2<'_, f32>, ArrayView1<'_, f32>)> {
        self.check().ok()?;
        let w = ArrayView2::from_shape((C, F), &self.weight).ok()?;
        Some((w, ArrayView1::from(&self.bias[..])))
    }
}

/// Hyper-parameters of one client's local training (mini-batch SGD).
///
/// The objective is the mean softmax cross-entropy over a batch plus
/// `l2 / 2 * ||W||^2` (the bias is not regularised).
#[derive(Clone, Copy, Debug)]
pub struct LocalTraining {
    /// Passes over the local data per call to [`train`].
    pub epochs: usize,
    /// Examples per SGD step (the last batch of an epoch may be smaller);
    /// 0 is treated as 1.
    pub batch_size: usize,
    /// SGD step size.
    pub learning_rate: f32,
    /// L2 (weight-decay) coefficient on `W`.
    pub l2: f32,
}

impl Default for LocalTraining {
    /// `epochs: 5, batch_size: 4, learning_rate: 1.0, l2: 0.0`, tuned for the
    /// `shoal demo` federation (20 clients, Dirichlet(0.5) label skew, 20
    /// FedAvg rounds, 80/20 split of the digits data).
    ///
    /// With these values, over Dirichlet seeds 1..=100 the federated model
    /// reaches 0.955..0.975 test accuracy (mean 0.970) against 0.978 for the
    /// centralized baseline with 100 epochs; the gap never exceeded 0.023.
    /// Accuracy is flat for learning rates 0.7..2.0 and batch sizes 2..8;
    /// `l2 >= 1e-4` only made the (long) centralized run noisier.
    fn default() -> Self {
        LocalTraining { epochs: 5, batch_size: 4, learning_rate: 1.0, l2: 0.0 }
    }
}

/// Whether `params` and `data` have the shapes the model code relies on.
fn compatible(params: &SoftmaxParams, data: &Dataset) -> bool {
    params.check().is_ok() && data.check().is_ok()
}

/// Logits `x W^T + b`, shape `[m, 10]`, for a batch `x` of shape `[m, 64]`.
fn logits(w: &ArrayView2<'_, f32>, b: &ArrayView1<'_, f32>, x: &ArrayView2<'_, f32>) -> Array2<f32> {
    let mut z = x.dot(&w.t());
    z += b;
    z
}

/// Replaces each row of `z` (`[m, 10]`) by its softmax, in place.
fn softmax_rows(z: &mut Array2<f32>) {
    for mut row in z.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row /= sum;
    }
}

/// Gradient of `mean_i CE(softmax(W x_i + b), y_i) + l2/2 ||W||^2` with
/// respect to `(W, b)`, shapes `[10, 64]` and `[10]`, for the batch `x`
/// (`[m, 64]`, `m >= 1`) with labels `y` (`m` values `< 10`).
fn gradient(
    w: &ArrayView2<'_, f32>,
    b: &ArrayView1<'_, f32>,
    x: &ArrayView2<'_, f32>,
    y: &[u8],
    l2: f32,
) -> (Array2<f32>, Array1<f32>) {
    let mut delta = logits(w, b, x);
    softmax_rows(&mut delta);
    // d CE / d logits = softmax - onehot(y)
    for (mut row, &label) in delta.rows_mut().into_iter().zip(y) {
        row[usize::from(label)] -= 1.0;
    }
    delta /= y.len().max(1) as f32;
    let mut grad_w = delta.t().dot(x);
    grad_w.scaled_add(l2, w);
    let grad_b = delta.sum_axis(Axis(0));
    (grad_w, grad_b)
}

/// Trains `params` in place with mini-batch SGD on `data`.
///
/// Runs `cfg.epochs` passes; each pass visits the examples in a fresh random
/// order drawn from `rng` and takes one step
/// `W -= lr * (dCE/dW + l2 * W)`, `b -= lr * dCE/db` per batch of
/// `cfg.batch_size` examples, where CE is the batch-mean cross-entropy.
/// `data.features` is `[n, 64]` `f32`; `params` are the `[10, 64]` / `[10]`
/// `f32` tensors described on [`SoftmaxParams`].
///
/// Does nothing if `data` is empty, or if `params` or `data` fail their
/// `check()` (wrong shapes or labels >= 10); it never panics.
pub fn train(params: &mut SoftmaxParams, data: &Dataset, cfg: &LocalTraining, rng: &mut impl Rng) {
    if data.is_empty() || !compatible(params, data) {
        return;
    }
    let Some((w0, b0)) = params.views() else {
        return;
    };
    let mut w = w0.to_owned();
    let mut b = b0.to_owned();
    let lr = cfg.learning_rate;
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut batch_labels: Vec<u8> = Vec::with_capacity(cfg.batch_size.max(1));
    for _ in 0..cfg.epochs {
        order.shuffle(rng);
        for batch in order.chunks(cfg.batch_size.max(1)) {
            let x = data.features.select(Axis(0), batch);
            batch_labels.clear();
            batch_labels.extend(batch.iter().map(|&i| data.labels[i]));
            let (gw, gb) = gradient(&w.view(), &b.view(), &x.view(), &batch_labels, cfg.l2);
            w.scaled_add(-lr, &gw);
            b.scaled_add(-lr, &gb);
        }
    }
    params.weight = w.into_iter().collect();
    params.bias = b.to_vec();
}

/// Fraction of examples in `data` (`[n, 64]` features) whose arg-max logit
/// (ties to the lowest class) equals the label; in `[0, 1]`.
///
/// Returns NaN if `data` is empty or `params`/`data` fail their `check()`.
pub fn accuracy(params: &SoftmaxParams, data: &Dataset) -> f64 {
    match predict(params, data) {
        Some(pred) => {
            let correct = pred.iter().zip(&data.labels).filter(|(p, y)| **p == usize::from(**y)).count();
            correct as f64 / data.len() as f64
        }
        None => f64::NAN,
    }
}

/// The arg-max class of every example (ties to the lowest class); `None` if `data` is empty or
/// `params`/`data` fail their `check()`.
fn predict(params: &SoftmaxParams, data: &Dataset) -> Option<Vec<usize>> {
    if data.is_empty() || !compatible(params, data) {
        return None;
    }
    let (w, b) = params.views()?;
    let z = logits(&w, &b, &data.features.view());
    Some(
        z.rows()
            .into_iter()
            .map(|row| {
                let mut best = 0;
                for (c, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = c;
                    }
                }
                best
            })
            .collect(),
    )
}

/// Per-class F1 score of `params` on `data`, indexed by class (10 values in [0, 1]): the
/// harmonic mean of precision and recall of each class, 0 for a class with no true positive.
/// All zeros if `data` is empty or the shapes are wrong.
pub fn class_f1(params: &SoftmaxParams, data: &Dataset) -> Vec<f64> {
    let Some(pred) = predict(params, data) else {
        return vec![0.0; C];
    };
    let (mut tp, mut fp, mut fneg) = ([0usize; C], [0usize; C], [0usize; C]);
    for (&p, &y) in pred.iter().zip(&data.labels) {
        let y = usize::from(y);
        if p == y {
            tp[y] += 1;
        } else {
            fp[p] += 1;
            if y < C {
                fneg[y] += 1;
            }
        }
    }
    (0..C)
        .map(|c| if tp[c] == 0 { 0.0 } else { 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fneg[c]) as f64 })
        .collect()
}

/// Mean softmax cross-entropy (natural log, no L2 term) of `params` on
/// `data` (`[n, 64]` features), accumulated in `f64`.
///
/// Returns NaN if `data` is empty or `params`/`data` fail their `check()`.
pub fn loss(params: &SoftmaxParams, data: &Dataset) -> f64 {
    if data.is_empty() || !compatible(params, data) {
        return f64::NAN;
    }
    let Some((w, b)) = params.views() else {
        return f64::NAN;
    };
    let z = logits(&w, &b, &data.features.view());
    let total: f64 = z
        .rows()
        .into_iter()
        .zip(&data.labels)
        .map(|(row, &label)| {
            let max = row.fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            lse - row[usize::from(label)] as f64
        })
        .sum();
    total / data.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_f1_matches_a_hand_count() {
        // A model predicting class 0 for everything: on labels [0, 0, 1, 2], class 0 has
        // tp 2, fp 2, fn 0 -> F1 = 4/6; classes 1 and 2 have no true positive -> 0.
        let mut p = SoftmaxParams::zeros();
        p.bias[0] = 1.0;
        let data = Dataset { features: ndarray::Array2::zeros((4, F)), labels: vec![0, 0, 1, 2] };
        let f1 = class_f1(&p, &data);
        assert!((f1[0] - 4.0 / 6.0).abs() < 1e-12);
        assert!(f1[1..].iter().all(|&v| v == 0.0));
        assert_eq!(accuracy(&p, &data), 0.5);
    }
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Reference objective in f64: mean CE + l2/2 ||W||^2.
    fn objective_f64(w: &[f64], b: &[f64], x: &[Vec<f64>], y: &[usize], l2: f64) -> f64 {
        let mut total = 0.0;
        for (xi, &yi) in x.iter().zip(y) {
            let z: Vec<f64> =
                (0..C).map(|c| b[c] + (0..F).map(|j| w[c * F + j] * xi[j]).sum::<f64>()).collect();
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            total += lse - z[yi];
        }
        total / x.len() as f64 + 0.5 * l2 * w.iter().map(|v| v * v).sum::<f64>()
    }

    #[test]
    fn zero_params_predict_uniformly() {
        // One sample, zero weights: p = 1/10 for every class, so
        // dCE/db = p - onehot(y) = 0.1 everywhere except -0.9 at y, and
        // dCE/dW[c, j] = (p_c - [c == y]) * x_j.
        let p = SoftmaxParams::zeros();
        let (w, b) = p.views().expect("zeros has the right shapes");
        let mut x = Array2::<f32>::zeros((1, F));
        x[[0, 3]] = 0.5;
        let (gw, gb) = gradient(&w, &b, &x.view(), &[2], 0.0);
        for c in 0..C {
            let expected = if c == 2 { -0.9 } else { 0.1 };
            assert!((gb[c] - expected).abs() < 1e-6);
            assert!((gw[[c, 3]] - 0.5 * expected).abs() < 1e-6);
            assert_eq!(gw[[c, 0]], 0.0);
        }
        let ds = Dataset { features: x, labels: vec![2] };
        assert!((loss(&p, &ds) - 10f64.ln()).abs() < 1e-9);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // Two samples, non-trivial parameters; central differences of the
        // f64 reference objective against the f32 analytic gradient.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let w: Vec<f64> = (0..C * F).map(|_| rng.gen_range(-0.5..0.5)).collect();
        let b: Vec<f64> = (0..C).map(|_| rng.gen_range(-0.5..0.5)).collect();
        let x: Vec<Vec<f64>> =
            (0..2).map(|_| (0..F).map(|_| f64::from(rng.gen_range(0u8..=16)) / 16.0).collect()).collect();
        let y = [1usize, 7];
        let l2 = 0.01;

        let params = SoftmaxParams {
            weight: w.iter().map(|&v| v as f32).collect(),
            bias: b.iter().map(|&v| v as f32).collect(),
        };
        let xs = Array2::from_shape_fn((2, F), |(i, j)| x[i][j] as f32);
        let (wv, bv) = params.views().expect("right shapes");
        let (gw, gb) = gradient(&wv, &bv, &xs.view(), &[1, 7], l2 as f32);

        let h = 1e-5;
        // Check every bias and a spread of weights (both classes with and
        // without a label, several features).
        for c in 0..C {
            let (mut bp, mut bm) = (b.clone(), b.clone());
            bp[c] += h;
            bm[c] -= h;
            let fd = (objective_f64(&w, &bp, &x, &y, l2) - objective_f64(&w, &bm, &x, &y, l2)) / (2.0 * h);
            assert!((fd - f64::from(gb[c])).abs() < 1e-4, "b[{c}]: fd {fd} vs {}", gb[c]);
            for j in [0, 5, 20, 37, 63] {
                let (mut wp, mut wm) = (w.clone(), w.clone());
                wp[c * F + j] += h;
                wm[c * F + j] -= h;
                let fd =
                    (objective_f64(&wp, &b, &x, &y, l2) - objective_f64(&wm, &b, &x, &y, l2)) / (2.0 * h);
                let an = f64::from(gw[[c, j]]);
                assert!((fd - an).abs() < 1e-4, "W[{c},{j}]: fd {fd} vs {an}");
            }
        }
    }

    #[test]
    fn training_on_full_data_fits_well() {
        let ds = Dataset::digits().expect("embedded data parses");
        let mut params = SoftmaxParams::zeros();
        let before = loss(&params, &ds);
        let cfg = LocalTraining { epochs: 10, ..LocalTraining::default() };
        train(&mut params, &ds, &cfg, &mut ChaCha8Rng::seed_from_u64(0));
        params.check().expect("shapes preserved");
        let acc = accuracy(&params, &ds);
        assert!(acc > 0.9, "train accuracy {acc}");
        assert!(loss(&params, &ds) < before);
    }

    #[test]
    fn malformed_inputs_do_not_panic() {
        let ds = Dataset::digits().expect("embedded data parses").subset(&[0, 1, 2]);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut bad = SoftmaxParams { weight: vec![0.0; 3], bias: vec![0.0; C] };
        assert!(matches!(bad.check(), Err(SimError::Shape(_))));
        train(&mut bad, &ds, &LocalTraining::default(), &mut rng);
        assert_eq!(bad.weight.len(), 3);
        assert!(accuracy(&bad, &ds).is_nan());
        assert!(loss(&bad, &ds).is_nan());

        let mut good = SoftmaxParams::zeros();
        let empty = ds.subset(&[]);
        train(&mut good, &empty, &LocalTraining::default(), &mut rng);
        assert_eq!(good, SoftmaxParams::zeros());
        assert!(accuracy(&good, &empty).is_nan());
        let bad_labels = Dataset { features: ds.features.clone(), labels: vec![0, 11, 2] };
        train(&mut good, &bad_labels, &LocalTraining::default(), &mut rng);
        assert_eq!(good, SoftmaxParams::zeros());
        let zero_batch = LocalTraining { batch_size: 0, ..LocalTraining::default() };
        train(&mut good, &ds, &zero_batch, &mut rng);
        assert!(good.weight.iter().all(|v| v.is_finite()));
    }
}
