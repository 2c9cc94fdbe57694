//! Running statistics of stale delta updates (issue 14 §3, `functions/src/statistics.rs`).
//!
//! In an asynchronous delta job (FedBuff, FedFix, asynchronous FedAvg), a `statistic` or
//! `variance` tensor (`bn.running_mean`, `bn.running_var`) must commit as the weighted mean of
//! the values the clients computed. A stale update's delta is relative to the model it trained
//! from (version `current − staleness`), not to `current`, which the top's step adds it to; the
//! leaf therefore adds `weight · (base − current)` of each such tensor to its partial
//! ([`PartialAggregate::rebase_statistics`]) before the partial leaves the node, once per folded
//! stale update, with the weight it was folded with.
//!
//! The leaf holds, per job, the statistic tensors of the model versions stale updates can name
//! (`current − max_staleness ..= current`, all still in `shoal-models`: the top keeps
//! `max_staleness + 2` versions). Each version is read once (a transient O(model) read) and only
//! its statistic tensors stay resident: the other tensors of the kept `Parameters` are zero
//! pages never written. Versions that fall out of the window are dropped, so resident memory is
//! O(statistics × (max_staleness + 1)). They are read before the leaf takes a round's harvest,
//! so a read failure loses nothing: the collection is not answered and the top collects again.

use std::collections::BTreeMap;
use std::sync::Arc;

use shoal_functions::{
    JobId, JobSpec, ModelManifest, ModelVersion, Parameters, PartialAggregate, UpdateKind,
};

use crate::error::Result;
use crate::host::Held;
use crate::nats::Infra;

/// The statistic tensors of the model versions one job's stale updates can be based on.
#[derive(Debug)]
pub struct StatisticBases {
    /// Whether the job needs them: asynchronous, delta updates, a statistic or variance tensor.
    needed: bool,
    max_staleness: u64,
    manifest: Arc<ModelManifest>,
    /// By version: the statistic tensors (other tensors zero, never written).
    models: BTreeMap<ModelVersion, Parameters>,
}

impl StatisticBases {
    /// For `spec`'s job (nothing is ever read for a job that does not need it).
    pub fn new(spec: &JobSpec, manifest: &Arc<ModelManifest>) -> StatisticBases {
        let rule = spec.round_rule();
        let has_statistics = manifest.tensors().iter().any(|t| t.policy.is_statistic());
        StatisticBases {
            needed: rule.asynchronous && spec.update_kind == UpdateKind::Delta && has_statistics,
            max_staleness: rule.max_staleness,
            manifest: Arc::clone(manifest),
            models: BTreeMap::new(),
        }
    }

    /// Whether the job rebases anything.
    pub fn needed(&self) -> bool {
        self.needed
    }

    /// Reads the versions `current − max_staleness ..= current` not held yet and drops the
    /// older ones.
    ///
    /// # Errors
    /// NATS errors reading a model; a model that does not fit the manifest.
    pub async fn prepare(&mut self, infra: &Infra, job: &JobId, current: ModelVersion) -> Result<()> {
        if !self.needed {
            return Ok(());
        }
        let oldest = current.0.saturating_sub(self.max_staleness);
        self.models.retain(|v, _| v.0 >= oldest && v.0 <= current.0);
        for v in oldest..=current.0 {
            let version = ModelVersion(v);
            if self.models.contains_key(&version) {
                continue;
            }
            let full = crate::jobs::load_model(infra, job, version, &self.manifest).await?;
            self.models.insert(version, statistics_only(&self.manifest, &full));
        }
        Ok(())
    }

    /// Rebases `partial` for the stale updates among `held` (folded with `fold_weight`, based
    /// `staleness` versions behind `current`); returns how many. [`Self::prepare`] must have
    /// run for `current`.
    ///
    /// # Errors
    /// [`crate::Error::Functions`] if a needed version is not held (the caller did not
    /// prepare) or the partial's manifest differs; nothing changes for the update that failed.
    pub fn rebase(
        &self,
        current: ModelVersion,
        partial: &mut PartialAggregate,
        held: &[Held],
    ) -> Result<usize> {
        if !self.needed {
            return Ok(0);
        }
        let missing = || shoal_functions::Error::ManifestMismatch("base model version not held for a rebase");
        let mut n = 0;
        for h in held.iter().filter(|h| h.staleness > 0 && h.fold_weight > 0.0) {
            let now = self.models.get(&current).ok_or_else(missing)?;
            let base = current.0.checked_sub(h.staleness).map(ModelVersion);
            let base = base.and_then(|b| self.models.get(&b)).ok_or_else(missing)?;
            partial.rebase_statistics(h.fold_weight, base, now)?;
            n += 1;
        }
        Ok(n)
    }
}

/// `full`'s statistic and variance tensors in otherwise untouched zero parameters.
fn statistics_only(manifest: &Arc<ModelManifest>, full: &Parameters) -> Parameters {
    let mut only = Parameters::zeros(Arc::clone(manifest));
    for (t, s) in manifest.tensors().iter().zip(manifest.slots()) {
        if t.policy.is_statistic() {
            let range = s.byte_offset..s.byte_offset + s.byte_len;
            only.as_bytes_mut()[range.clone()].copy_from_slice(&full.as_bytes()[range]);
        }
    }
    only
}
