//! FedAvg: the `num_examples`-weighted mean of client updates.
//!
//! McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
//! Networks from Decentralized Data", AISTATS 2017 (arXiv:1602.05629), Algorithm 1's server
//! step: `w_{t+1} = Σ_k (n_k / n) w^k_{t+1}`. With [`UpdateKind::Delta`] updates the server step
//! is `w_{t+1} = w_t + η_s Σ_k (n_k / n) Δ^k` (η_s = `server_learning_rate`, 1 gives the
//! paper's rule).
//!
//! Folding is eager: each update is added into one preallocated f64 accumulator as it arrives
//! (memory O(model), not O(clients × model)), and partials from several aggregators merge by
//! addition. The result is independent of arrival order and hierarchy up to f64 rounding of the
//! sums: for ordinary updates that is below the f32 output's half-ulp, so outputs agree exactly
//! (property-tested); an f32 result lying within ~1e-16 relative of a rounding tie can differ by
//! one ulp, and sums with catastrophic cancellation (values ~1e30 of opposite signs) are only as
//! exact as f64 allows. The output is always checked finite: an overflow in the server step
//! is [`Error::NonFiniteResult`], never an Inf model.
//!
//! `statistic` and `variance` tensors (running statistics) get the weighted mean of the
//! clients' values in both forms, without η_s (`global + mean delta` for deltas), variances
//! clamped at 0.

use crate::error::{Error, Result};
use crate::spec::UpdateKind;
use crate::statistics::statistic_value;
use crate::strategy::{Mergeability, PartialAggregate, Strategy};
use crate::tensor::{AggregationPolicy, Parameters};

/// Federated averaging.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAvg {
    /// Whether clients send full parameters or deltas from the base model.
    pub update_kind: UpdateKind,
    /// η_s, applied to the averaged delta ([`UpdateKind::Delta`] only).
    pub server_learning_rate: f64,
}

impl FedAvg {
    /// FedAvg over full parameters (the paper's form).
    pub fn parameters() -> FedAvg {
        FedAvg { update_kind: UpdateKind::Parameters, server_learning_rate: 1.0 }
    }

    /// FedAvg over deltas with server learning rate `lr`.
    pub fn deltas(lr: f64) -> FedAvg {
        FedAvg { update_kind: UpdateKind::Delta, server_learning_rate: lr }
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn mergeability(&self) -> Mergeability {
        Mergeability::Streaming
    }

    fn finish(&mut self, partial: &PartialAggregate, global: &Parameters) -> Result<Parameters> {
        let mut out = global.clone();
        self.finish_into(partial, &mut out)?;
        Ok(out)
    }

    fn finish_reads_global(&self, manifest: &crate::ModelManifest) -> bool {
        self.update_kind == UpdateKind::Delta
            || manifest.tensors().iter().any(|t| t.policy == AggregationPolicy::Skip)
    }

    /// Over parameters (the global model is not read): the new model is computed from the
    /// accumulator as it is stored, with the same values as [`Self::finish_into`].
    fn finish_streamed(
        &mut self,
        partial: &std::sync::Arc<PartialAggregate>,
    ) -> Option<Result<crate::tensor::AccumulatorModel>> {
        let manifest = partial.manifest();
        if self.finish_reads_global(manifest) {
            return None;
        }
        let (total, count) = (partial.total_weight(), partial.count());
        if count == 0 || !(total > 0.0 && total.is_finite()) {
            return Some(Err(Error::ZeroTotalWeight { total, count }));
        }
        use crate::tensor::ElementOp;
        let ops = manifest
            .tensors()
            .iter()
            .map(|t| match t.policy {
                AggregationPolicy::Mean => ElementOp::Divide(total),
                AggregationPolicy::Statistic | AggregationPolicy::Variance => {
                    ElementOp::Statistic { total, clamp_at_zero: t.policy == AggregationPolicy::Variance }
                }
                _ => ElementOp::Copy,
            })
            .collect();
        Some(crate::tensor::AccumulatorModel::new(std::sync::Arc::clone(partial), ops))
    }

    /// In place: every element of the new model depends only on the same element of the old
    /// one, so `global` is overwritten tensor by tensor with no model-sized copy.
    fn finish_into(&mut self, partial: &PartialAggregate, global: &mut Parameters) -> Result<()> {
        partial.check_manifest(global.manifest())?;
        let total = partial.total_weight();
        if partial.count() == 0 || !(total > 0.0 && total.is_finite()) {
            return Err(Error::ZeroTotalWeight { total, count: partial.count() });
        }
        let manifest = std::sync::Arc::clone(global.manifest());
        let lr = self.server_learning_rate;
        for (i, spec) in manifest.tensors().iter().enumerate() {
            let acc = partial.tensor_values(i);
            match (spec.policy, self.update_kind) {
                (AggregationPolicy::Skip, _) => {}
                (AggregationPolicy::Statistic | AggregationPolicy::Variance, UpdateKind::Parameters) => {
                    global.map_tensor_f64(i, |e, _| statistic_value(spec.policy, 0.0, acc[e], total))
                }
                (AggregationPolicy::Statistic | AggregationPolicy::Variance, UpdateKind::Delta) => {
                    global.map_tensor_f64(i, |e, g| statistic_value(spec.policy, g, acc[e], total))
                }
                (AggregationPolicy::Mean, UpdateKind::Parameters) => {
                    global.map_tensor_f64(i, |e, _| acc[e] / total)
                }
                (AggregationPolicy::Mean, UpdateKind::Delta) => {
                    global.map_tensor_f64(i, |e, g| g + lr * (acc[e] / total))
                }
                (_, UpdateKind::Parameters) => global.map_tensor_f64(i, |e, _| acc[e]),
                (_, UpdateKind::Delta) => global.map_tensor_f64(i, |e, g| g + acc[e]),
            }
        }
        if let Err(crate::tensor::ValidationError::NonFinite { name, .. }) =
            crate::tensor::check_finite(&manifest, global.as_bytes())
        {
            return Err(Error::NonFiniteResult(name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::tensor::{DType, ModelManifest, TensorSpec};
    use crate::ClientId;

    fn cid(s: &str) -> ClientId {
        ClientId::new(s).unwrap()
    }

    fn spec(name: &str, dtype: DType, shape: Vec<usize>, policy: crate::AggregationPolicy) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape, policy }
    }

    /// Flower cross-check vector 1/2 (flower.md §5.1): A=[[1,2],[[0]]] n=1, B=[[3,6],[[4]]] n=3
    /// give [[2.5,5.0],[[3.0]]].
    #[test]
    fn flower_vector_weighted_mean() {
        let m = Arc::new(
            ModelManifest::new(vec![
                TensorSpec::new("l0", DType::F32, vec![2]),
                TensorSpec::new("l1", DType::F32, vec![1, 1]),
            ])
            .unwrap(),
        );
        let a = Parameters::from_f64(Arc::clone(&m), &[vec![1.0, 2.0], vec![0.0]]).unwrap();
        let b = Parameters::from_f64(Arc::clone(&m), &[vec![3.0, 6.0], vec![4.0]]).unwrap();
        let (ca, cb) = (cid("a"), cid("b"));
        let mut s = FedAvg::parameters();
        let out = s
            .aggregate_cohort(
                &[a.as_update(&ca, 1.0), b.as_update(&cb, 3.0)],
                &Parameters::zeros(Arc::clone(&m)),
            )
            .unwrap();
        assert_eq!(out.tensor_f64(0), vec![2.5, 5.0]);
        assert_eq!(out.tensor_f64(1), vec![3.0]);
    }

    /// The top hands zeros to `finish_into` when `finish_reads_global` says the old model is not
    /// read: the result must equal `finish` from the real global model, element for element,
    /// for every policy but `skip` (and `skip` or delta updates must say they read it).
    #[test]
    fn finish_into_zeros_equals_finish_when_the_global_is_not_read() {
        use crate::AggregationPolicy as P;
        let m = Arc::new(
            ModelManifest::new(vec![
                spec("w", DType::F32, vec![3], P::Mean),
                spec("h", DType::F16, vec![2], P::Mean),
                spec("bn.running_var", DType::F32, vec![2], P::Variance),
                spec("bn.running_mean", DType::F64, vec![2], P::Statistic),
                spec("n", DType::I64, vec![], P::Max),
            ])
            .unwrap(),
        );
        let a = Parameters::from_f64(
            Arc::clone(&m),
            &[vec![1.0, -2.0, 0.3], vec![0.5, 1.5], vec![0.2, 0.1], vec![1.0, 2.0], vec![7.0]],
        )
        .unwrap();
        let b = Parameters::from_f64(
            Arc::clone(&m),
            &[vec![3.0, 6.5, -0.1], vec![-1.0, 2.0], vec![0.4, 0.0], vec![-3.0, 4.0], vec![9.0]],
        )
        .unwrap();
        let global = Parameters::from_f64(
            Arc::clone(&m),
            &[vec![9.0, 9.0, 9.0], vec![9.0, 9.0], vec![9.0, 9.0], vec![9.0, 9.0], vec![99.0]],
        )
        .unwrap();
        let (ca, cb) = (cid("a"), cid("b"));
        let mut s = FedAvg::parameters();
        assert!(!s.finish_reads_global(&m));
        let mut p = PartialAggregate::new(Arc::clone(&m));
        s.fold(&mut p, &a.as_update(&ca, 1.0)).unwrap();
        s.fold(&mut p, &b.as_update(&cb, 3.0)).unwrap();
        let want = s.finish(&p, &global).unwrap();
        let mut got = Parameters::zeros(Arc::clone(&m));
        s.finish_into(&p, &mut got).unwrap();
        assert_eq!(got.as_bytes(), want.as_bytes());
        // Hand-derived (exact in f32): (1·x_a + 3·x_b) / 4.
        assert_eq!(want.tensor_f64(0)[..2], [2.5, 4.375]);
        assert!(FedAvg::deltas(1.0).finish_reads_global(&m));
        let skip = Arc::new(ModelManifest::new(vec![spec("s", DType::F32, vec![1], P::Skip)]).unwrap());
        assert!(FedAvg::parameters().finish_reads_global(&skip));
    }

    /// The model computed from the accumulator as it is read is `finish`'s model's file bit for
    /// bit, for every dtype and policy FedAvg over parameters has, whatever the read sizes.
    #[test]
    fn finish_streamed_reads_the_file_finish_would_write() {
        use crate::AggregationPolicy as P;
        let m = Arc::new(
            ModelManifest::new(vec![
                spec("w", DType::F32, vec![40], P::Mean),
                spec("h", DType::BF16, vec![3], P::Mean),
                spec("bn.running_var", DType::F32, vec![16], P::Variance),
                spec("bn.running_mean", DType::F64, vec![5], P::Statistic),
                spec("n", DType::I64, vec![], P::Max),
            ])
            .unwrap(),
        );
        let values = |seed: f64| -> Vec<Vec<f64>> {
            m.slots()
                .iter()
                .map(|s| (0..s.numel).map(|j| ((j as f64 + seed) * 0.731).sin() * 5.0).collect())
                .collect()
        };
        let a = Parameters::from_f64(Arc::clone(&m), &values(1.0)).unwrap();
        let b = Parameters::from_f64(Arc::clone(&m), &values(2.5)).unwrap();
        let (ca, cb) = (cid("a"), cid("b"));
        let mut s = FedAvg::parameters();
        let mut p = PartialAggregate::new(Arc::clone(&m));
        s.fold(&mut p, &a.as_update(&ca, 1.0)).unwrap();
        s.fold(&mut p, &b.as_update(&cb, 3.0)).unwrap();
        let want = s.finish(&p, &Parameters::zeros(Arc::clone(&m))).unwrap();
        let want_file = want.to_safetensors().unwrap();
        // Hand-derived: w[0] = (1·5 sin(0.731) + 3·5 sin(1.8275)) / 4, rounded to f32.
        let w0 = (5.0 * 0.731f64.sin() + 15.0 * (2.5 * 0.731f64).sin()) / 4.0;
        assert_eq!(want.tensor_f64(0)[0], f64::from(w0 as f32));
        let p = Arc::new(p);
        for step in [1usize, 3, 7, 64, 1 << 20] {
            let mut model = s.finish_streamed(&p).unwrap().unwrap();
            model.check_finite().unwrap();
            assert_eq!(model.len(), want_file.len());
            let (mut file, mut buf) = (Vec::new(), vec![0u8; step]);
            loop {
                let n = model.read(&mut buf);
                if n == 0 {
                    break;
                }
                file.extend_from_slice(&buf[..n]);
            }
            assert!(file == want_file, "reads of {step} bytes give another file");
        }
        // Over deltas the old model is read: no streamed result.
        assert!(FedAvg::deltas(1.0).finish_streamed(&p).is_none());
        // An empty partial is ZeroTotalWeight, as from `finish`.
        let empty = Arc::new(PartialAggregate::new(Arc::clone(&m)));
        assert!(matches!(s.finish_streamed(&empty), Some(Err(Error::ZeroTotalWeight { .. }))));
        // An accumulator that overflowed (weight 1e308 × values up to 5) is a non-finite
        // result, found before anything is stored, as `finish` finds it.
        let mut p = PartialAggregate::new(Arc::clone(&m));
        s.fold(&mut p, &a.as_update(&ca, 1e308)).unwrap();
        s.fold(&mut p, &b.as_update(&cb, 1.0)).unwrap();
        let zeros = Parameters::zeros(Arc::clone(&m));
        assert!(matches!(s.finish(&p, &zeros), Err(Error::NonFiniteResult(n)) if n == "w"));
        let e = s.finish_streamed(&Arc::new(p)).unwrap().unwrap().check_finite();
        assert!(matches!(&e, Err(Error::NonFiniteResult(n)) if n == "w"), "{e:?}");
    }

    /// bug-cases.md #9: int64 [10] and [21], equal weights: 16 (round half to even of 15.5),
    /// not 15 (per-term truncation) nor 0 (Flower's in-place path). Flower vector 11/12: [10],
    /// [20] give 15 in the declared int64 dtype.
    #[test]
    fn integer_mean_rounds_half_to_even() {
        let m = Arc::new(ModelManifest::new(vec![TensorSpec::new("n", DType::I64, vec![1])]).unwrap());
        let run = |x: f64, y: f64| {
            let a = Parameters::from_f64(Arc::clone(&m), &[vec![x]]).unwrap();
            let b = Parameters::from_f64(Arc::clone(&m), &[vec![y]]).unwrap();
            let (ca, cb) = (cid("a"), cid("b"));
            FedAvg::parameters()
                .aggregate_cohort(
                    &[a.as_update(&ca, 1.0), b.as_update(&cb, 1.0)],
                    &Parameters::zeros(Arc::clone(&m)),
                )
                .unwrap()
                .tensor_f64(0)
        };
        assert_eq!(run(10.0, 21.0), vec![16.0]);
        assert_eq!(run(10.0, 20.0), vec![15.0]);
        assert_eq!(run(10.0, 13.0), vec![12.0], "11.5 rounds to the even 12");
    }

    /// bug-cases.md #8: BatchNorm counters [10,20,30,40] under `max` give 40, dtype kept.
    #[test]
    fn max_and_first_and_skip_policies() {
        let mut specs = vec![
            TensorSpec::new("bn.num_batches_tracked", DType::I64, vec![]),
            TensorSpec::new("first", DType::F32, vec![1]),
            TensorSpec::new("frozen", DType::F32, vec![1]),
        ];
        specs[0].policy = AggregationPolicy::Max;
        specs[1].policy = AggregationPolicy::First;
        specs[2].policy = AggregationPolicy::Skip;
        let m = Arc::new(ModelManifest::new(specs).unwrap());
        let ids: Vec<ClientId> = ["d", "b", "c", "a"].iter().map(|s| cid(s)).collect();
        let ps: Vec<Parameters> = [10.0, 20.0, 30.0, 40.0]
            .iter()
            .map(|&v| Parameters::from_f64(Arc::clone(&m), &[vec![v], vec![v], vec![v]]).unwrap())
            .collect();
        let views: Vec<_> = ps.iter().zip(&ids).map(|(p, c)| p.as_update(c, 1.0)).collect();
        let global = Parameters::from_f64(Arc::clone(&m), &[vec![0.0], vec![0.0], vec![7.0]]).unwrap();
        let out = FedAvg::parameters().aggregate_cohort(&views, &global).unwrap();
        assert_eq!(out.tensor_f64(0), vec![40.0]);
        assert_eq!(out.tensor_f64(1), vec![40.0], "client \"a\" sent 40");
        assert_eq!(out.tensor_f64(2), vec![7.0], "skip keeps the global value");
    }

    /// bug-cases.md #1/#3: zero total weight is a typed error, never a NaN model; invalid weights
    /// are refused before folding.
    #[test]
    fn zero_and_invalid_weights() {
        let m = Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![2])]).unwrap());
        let g = Parameters::zeros(Arc::clone(&m));
        let mut s = FedAvg::parameters();
        let e = s.finish(&PartialAggregate::new(Arc::clone(&m)), &g).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::ZeroTotalWeight);
        let a = Parameters::from_f64(Arc::clone(&m), &[vec![1.0, 2.0]]).unwrap();
        let c = cid("a");
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut p = PartialAggregate::new(Arc::clone(&m));
            let e = s.fold(&mut p, &a.as_update(&c, w)).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidWeight);
            assert_eq!(p.count(), 0);
        }
    }

    /// Delta updates: new = global + η_s · weighted mean delta.
    #[test]
    fn delta_server_step() {
        let m = Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![2])]).unwrap());
        let g = Parameters::from_f64(Arc::clone(&m), &[vec![1.0, 1.0]]).unwrap();
        let d1 = Parameters::from_f64(Arc::clone(&m), &[vec![1.0, -2.0]]).unwrap();
        let d2 = Parameters::from_f64(Arc::clone(&m), &[vec![3.0, 2.0]]).unwrap();
        let (a, b) = (cid("a"), cid("b"));
        let out = FedAvg::deltas(0.5)
            .aggregate_cohort(&[d1.as_update(&a, 1.0), d2.as_update(&b, 1.0)], &g)
            .unwrap();
        // mean delta = [2, 0]; 1 + 0.5*2 = 2, 1 + 0 = 1.
        assert_eq!(out.tensor_f64(0), vec![2.0, 1.0]);
    }

    /// f16 and bf16 are decoded, accumulated in f64 and re-encoded (bug-cases.md #10): f16
    /// 1.0 x2 with n = 100 000 each gives 1.0, not Flower's NaN (vector 9).
    #[test]
    fn half_precision_large_weights() {
        let m = Arc::new(
            ModelManifest::new(vec![
                TensorSpec::new("h", DType::F16, vec![1]),
                TensorSpec::new("b", DType::BF16, vec![4]),
            ])
            .unwrap(),
        );
        let a = Parameters::from_f64(Arc::clone(&m), &[vec![1.0], vec![1.0, 2.0, 3.0, 4.0]]).unwrap();
        let b = Parameters::from_f64(Arc::clone(&m), &[vec![1.0], vec![3.0, 2.0, 1.0, 0.5]]).unwrap();
        let (ca, cb) = (cid("a"), cid("b"));
        let out = FedAvg::parameters()
            .aggregate_cohort(
                &[a.as_update(&ca, 1e5), b.as_update(&cb, 1e5)],
                &Parameters::zeros(Arc::clone(&m)),
            )
            .unwrap();
        assert_eq!(out.tensor_f64(0), vec![1.0]);
        assert_eq!(out.tensor_f64(1), vec![2.0, 2.0, 2.0, 2.25]);
    }
}
