//! Types of the streaming variance measure's backend ops (docs/measure.md): the layout of one
//! layer's units, its running state, and the moments read back from it.
//!
//! The state keeps, for one layer, only what the definition needs and nothing that grows with
//! the number of samples n or the number of (sample, rotation) pairs:
//! * V_x: per (class k, rotation j, unit u), Welford mean and M2 over that class's samples;
//! * V_t: per (sample slot b of the current batch, unit u), Welford mean and M2 over the
//!   rotations seen so far for that sample, turned into one standard deviation when the last
//!   rotation arrives;
//! * per (class k, unit u), the running sum of those per-sample standard deviations.
//!
//! Both backends also check every update against the protocol here (rotations in order, labels
//! and ranks consistent), so a caller bug is an error, not a silently wrong measure.

use super::{cpu, cuda};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// How the H×W values of one feature map become one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapReduce {
    Sum,
    Mean,
    Max,
}

impl MapReduce {
    pub fn as_str(self) -> &'static str {
        match self {
            MapReduce::Sum => "sum",
            MapReduce::Mean => "mean",
            MapReduce::Max => "max",
        }
    }
    /// The `mode` argument of kernels/variance.cu.
    pub(crate) fn code(self) -> i32 {
        match self {
            MapReduce::Sum => 0,
            MapReduce::Mean => 1,
            MapReduce::Max => 2,
        }
    }
}

impl std::fmt::Display for MapReduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Layout of one layer for the variance measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VarianceGeom {
    /// Most samples one update may carry.
    pub batch: usize,
    /// Units per sample (C for one value per feature map, C·H·W per element, F for a dense layer).
    pub units: usize,
    /// Activation values reduced into one unit: H·W per feature map, 1 per element.
    pub hw: usize,
    /// How those `hw` values are reduced (irrelevant when `hw == 1`: every mode is the identity).
    pub reduce: MapReduce,
    /// Number of classes K (labels are 0..K).
    pub classes: usize,
    /// Number of rotations m.
    pub rotations: usize,
}

impl VarianceGeom {
    /// Every count at least 1, and every buffer length representable.
    pub fn check(&self) -> Result<()> {
        for (what, v) in [
            ("batch", self.batch),
            ("units", self.units),
            ("hw", self.hw),
            ("classes", self.classes),
            ("rotations", self.rotations),
        ] {
            if v == 0 {
                bail!("variance: {what} must be at least 1 (geometry {self:?})");
            }
        }
        let lens = [
            self.classes.checked_mul(self.rotations).and_then(|v| v.checked_mul(self.units)),
            self.batch.checked_mul(self.units).and_then(|v| v.checked_mul(self.hw)),
        ];
        if lens.iter().any(|l| l.is_none_or(|l| l > isize::MAX as usize / 8)) {
            bail!("variance: geometry {self:?} is too large to hold in memory");
        }
        Ok(())
    }
    /// Length of the V_x moment arrays, [classes][rotations][units].
    pub fn vx_len(&self) -> usize {
        self.classes * self.rotations * self.units
    }
    /// Length of the per-sample V_t moment arrays, [batch][units].
    pub fn vt_len(&self) -> usize {
        self.batch * self.units
    }
    /// Length of the per-class sums of standard deviations, [classes][units].
    pub fn sum_len(&self) -> usize {
        self.classes * self.units
    }
    /// Activation values an update of `n` samples carries, [n][units][hw].
    pub fn act_len(&self, n: usize) -> usize {
        n * self.units * self.hw
    }
}

/// The accumulators of one layer, on the device of the backend that created them.
pub(crate) enum VarianceData {
    Cpu(cpu::variance::CpuVariance),
    Cuda(Box<cuda::CudaVariance>),
}

/// A batch whose rotations are partly applied: the labels and ranks every later rotation of the
/// same batch must repeat.
struct OpenBatch {
    class: Vec<u32>,
    rank: Vec<u32>,
    next_j: usize,
}

/// The running state of the variance measure for one layer. Opaque: create it with
/// [`super::Backend::variance_init`], feed it with `variance_update`, read it with
/// `variance_read`, always through the backend that created it.
pub struct VarianceState {
    geom: VarianceGeom,
    /// Samples of each class whose every rotation has been applied.
    counts: Vec<u64>,
    open: Option<OpenBatch>,
    /// A batch begun with `Backend::variance_begin_fed`: its labels and ranks, which the fed
    /// updates of its m rotations use.
    fed: Option<FedBatch>,
    pub(crate) data: VarianceData,
}

/// The labels of a fed batch (`Backend::variance_begin_fed`).
pub(crate) struct FedBatch {
    pub class: Vec<u32>,
    pub rank: Vec<u32>,
    /// The class counts before the batch: the host reference path must have completed it.
    counts_before: Vec<u64>,
}

impl VarianceState {
    pub(crate) fn new(geom: VarianceGeom, data: VarianceData) -> Self {
        VarianceState { geom, counts: vec![0; geom.classes], open: None, fed: None, data }
    }

    pub fn geom(&self) -> &VarianceGeom {
        &self.geom
    }

    /// Samples per class whose every rotation has been applied.
    pub fn class_counts(&self) -> &[u64] {
        &self.counts
    }

    /// Checks one `variance_update` call against the geometry and the protocol without changing
    /// anything; every backend calls this before it touches the accumulators.
    pub(crate) fn check_update(&self, act_len: usize, n: usize, class: &[u32], rank: &[u32], j: usize) -> Result<()> {
        let g = &self.geom;
        if self.fed.is_some() {
            bail!("variance_update: a fed batch is in progress; end it first (variance_end_fed)");
        }
        if j >= g.rotations {
            bail!("variance_update: rotation index j = {j} is out of range for {} rotations", g.rotations);
        }
        if n == 0 || n > g.batch {
            bail!("variance_update: n = {n} samples, but an update carries 1 to batch = {} samples", g.batch);
        }
        if class.len() != n || rank.len() != n {
            bail!("variance_update: {} class labels and {} ranks for n = {n} samples", class.len(), rank.len());
        }
        if act_len != g.act_len(n) {
            bail!(
                "variance_update: the activation has {act_len} values, but n·units·hw = {n}·{}·{} = {}",
                g.units,
                g.hw,
                g.act_len(n)
            );
        }
        let expected = self.open.as_ref().map_or(0, |o| o.next_j);
        if j != expected {
            bail!(
                "variance_update: rotation j = {j} out of order, expected j = {expected} (each batch must be \
                 updated with j = 0, 1, …, {} in turn)",
                g.rotations - 1
            );
        }
        match &self.open {
            None => {
                let mut seen = self.counts.clone();
                for (b, (&k, &r)) in class.iter().zip(rank).enumerate() {
                    let Some(c) = seen.get_mut(k as usize) else {
                        bail!("variance_update: class[{b}] = {k} is out of range for {} classes", g.classes);
                    };
                    *c += 1;
                    if r as u64 != *c {
                        bail!(
                            "variance_update: rank[{b}] = {r} for class {k}, expected {} (the 1-based running \
                             count of class-{k} samples over the whole pass)",
                            *c
                        );
                    }
                }
            }
            Some(o) => {
                if o.class != class || o.rank != rank {
                    bail!(
                        "variance_update: the class labels or ranks of rotation j = {j} differ from those of j = 0 \
                         of the same batch"
                    );
                }
            }
        }
        Ok(())
    }

    /// Records a successful update (after `check_update` passed and the backend ran it).
    pub(crate) fn commit_update(&mut self, class: &[u32], rank: &[u32], j: usize) {
        if j + 1 == self.geom.rotations {
            for &k in class {
                self.counts[k as usize] += 1;
            }
            self.open = None;
        } else if j == 0 {
            self.open = Some(OpenBatch { class: class.to_vec(), rank: rank.to_vec(), next_j: 1 });
        } else if let Some(o) = &mut self.open {
            o.next_j = j + 1;
        }
    }

    /// Checks and records the labels of a batch whose m rotations run as fed updates
    /// (`Backend::variance_begin_fed`); they are checked as `variance_update` checks them at j = 0.
    pub(crate) fn begin_fed(&mut self, class: &[u32], rank: &[u32]) -> Result<()> {
        if self.fed.is_some() {
            bail!("variance_begin_fed: the previous fed batch has not been ended");
        }
        self.check_update(self.geom.act_len(class.len()), class.len(), class, rank, 0)?;
        self.fed = Some(FedBatch { class: class.to_vec(), rank: rank.to_vec(), counts_before: self.counts.clone() });
        Ok(())
    }

    /// The labels of the fed batch in progress.
    pub(crate) fn fed(&self) -> Result<&FedBatch> {
        self.fed.as_ref().ok_or_else(|| anyhow::anyhow!("variance_update_fed: no fed batch was begun"))
    }

    /// Runs `f` (the reference path's plain update of a fed rotation) with the fed batch set
    /// aside, so that the plain update's checks, which refuse an open fed batch, apply.
    pub(crate) fn with_fed_aside<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let fed = self.fed.take();
        let r = f(self);
        self.fed = fed;
        r
    }

    /// Ends the fed batch. `ran_all`: its updates have been recorded one by one (the host
    /// reference path, which must have reached j = m − 1); otherwise the device ran them
    /// unseen and they are recorded now, as j = 0, 1, …, m − 1.
    pub(crate) fn end_fed(&mut self, ran_all: bool) -> Result<()> {
        let Some(f) = self.fed.take() else {
            bail!("variance_end_fed: no fed batch was begun");
        };
        if ran_all {
            if self.open.is_some() || self.counts == f.counts_before {
                let applied = self.open.as_ref().map_or(0, |o| o.next_j);
                self.fed = Some(f);
                bail!(
                    "variance_end_fed: rotations 0..{applied} of {} applied; finish the batch first",
                    self.geom.rotations
                );
            }
        } else {
            for j in 0..self.geom.rotations {
                self.commit_update(&f.class, &f.rank, j);
            }
        }
        Ok(())
    }

    /// Reading in the middle of a batch would mix samples that have seen only some rotations.
    pub(crate) fn check_read(&self) -> Result<()> {
        if self.fed.is_some() {
            bail!("variance_read: a fed batch is in progress; end it first (variance_end_fed)");
        }
        if let Some(o) = &self.open {
            bail!(
                "variance_read: a batch is incomplete (rotations 0..{} of {} applied); finish it first",
                o.next_j,
                self.geom.rotations
            );
        }
        Ok(())
    }
}

/// The accumulators of one layer, read back to the host. All f64, class-major.
#[derive(Debug, Clone, PartialEq)]
pub struct VarianceMoments {
    pub geom: VarianceGeom,
    /// Samples per class (n_k); Σ_k n_k = n.
    pub class_counts: Vec<u64>,
    /// [classes][rotations][units]: mean over the class's samples of the unit at rotation j.
    pub vx_mean: Vec<f64>,
    /// [classes][rotations][units]: Welford M2 (sum of squared deviations from that mean).
    pub vx_m2: Vec<f64>,
    /// [classes][units]: Σ over the class's samples of the unbiased standard deviation over the
    /// m rotations (0 when m = 1).
    pub vt_sum_std: Vec<f64>,
}

/// One step of Welford's running mean and M2 with the new observation `v` as the `count`-th:
/// d = v − mean; mean += d / count; M2 += d·(v − mean). Every backend performs exactly these
/// roundings in this order (the CUDA kernel with explicitly rounded double intrinsics), so
/// their accumulators agree bit for bit.
#[inline]
pub fn welford_step(mean: &mut f64, m2: &mut f64, v: f64, count: f64) {
    let d = v - *mean;
    *mean += d / count;
    *m2 += d * (v - *mean);
}

/// The `rank` argument of [`crate::backend::Backend::variance_update`] for a batch with labels
/// `class`: each sample's 1-based running count within its class, continuing from `seen`
/// (per-class counts of the earlier batches), which is advanced past this batch.
pub fn class_ranks(seen: &mut [u32], class: &[u32]) -> Vec<u32> {
    class
        .iter()
        .map(|&k| {
            seen[k as usize] += 1;
            seen[k as usize]
        })
        .collect()
}

/// Unbiased standard deviation sqrt(M2 / (count − 1)) of `count` observations; 0 for a single
/// observation (or none), as the definition requires.
#[inline]
pub fn std_from_m2(m2: f64, count: f64) -> f64 {
    if count > 1.0 {
        (m2 / (count - 1.0)).sqrt()
    } else {
        0.0
    }
}

/// One unit's value from its `hw` activation values, in f64: the sum in index order, the mean as
/// that sum divided by `hw`, or the largest value (compared in f32, the first on ties; a NaN
/// that comes first stays, later NaNs are skipped by the comparison). Shared by the CPU backend
/// and mirrored by kernels/variance.cu.
#[inline]
pub fn reduce_unit(x: &[f32], reduce: MapReduce) -> f64 {
    match reduce {
        MapReduce::Sum | MapReduce::Mean => {
            let s = x.iter().fold(0.0f64, |s, &v| s + v as f64);
            if reduce == MapReduce::Mean {
                s / x.len() as f64
            } else {
                s
            }
        }
        MapReduce::Max => {
            let mut m = x[0];
            for &v in &x[1..] {
                if v > m {
                    m = v;
                }
            }
            m as f64
        }
    }
}
