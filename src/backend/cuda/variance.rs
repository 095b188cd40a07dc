//! The variance measure on the device (kernels/variance.cu): its accumulators, the label table
//! the update kernels read, and the launches behind `Backend::variance_init`, `variance_update`
//! and `variance_read`.

use super::device::{self, F64Buf};
use super::{i32_of, CudaBackend, BLOCK};
use crate::backend::cuda::emu::KArg;
use crate::backend::variance::VarianceData;
use crate::backend::{Storage, VarianceGeom, VarianceMoments, VarianceState};
use anyhow::{bail, Result};

/// The variance measure's accumulators on the device, in the class-major layout of
/// [`VarianceMoments`] (adjacent threads handle adjacent units, so accesses coalesce).
pub struct CudaVariance {
    vx_mean: F64Buf,
    vx_m2: F64Buf,
    vt_mean: F64Buf,
    vt_m2: F64Buf,
    sum_std: F64Buf,
    /// Scratch: the current batch's unit values, [slot][unit].
    vals: F64Buf,
    /// The current batch's labels (`variance_labels`), sent once per batch: every layer and
    /// rotation of a batch updates with the same ones.
    labels: Option<device::IdxBuf>,
    labels_host: Vec<u32>,
}

/// The label table of kernels/variance.cu: class[n] | rank[n] | start[classes + 1] | order[n],
/// where order lists the samples class by class, each class in increasing sample index, and
/// class k's are order[start[k]..start[k + 1]].
fn variance_labels(class: &[u32], rank: &[u32], classes: usize) -> Vec<u32> {
    let n = class.len();
    let mut start = vec![0u32; classes + 1];
    for &k in class {
        start[k as usize + 1] += 1;
    }
    for k in 0..classes {
        start[k + 1] += start[k];
    }
    let mut next = start.clone();
    let mut order = vec![0u32; n];
    for (b, &k) in class.iter().enumerate() {
        order[next[k as usize] as usize] = b as u32;
        next[k as usize] += 1;
    }
    let mut labels = Vec::with_capacity(3 * n + classes + 1);
    labels.extend_from_slice(class);
    labels.extend_from_slice(rank);
    labels.extend_from_slice(&start);
    labels.extend_from_slice(&order);
    labels
}

impl CudaBackend {
    /// `Backend::variance_init`: zeroed accumulators for `g`.
    pub(super) fn variance_state(&self, g: &VarianceGeom) -> Result<VarianceState> {
        g.check()?;
        // The kernels take these as int.
        i32_of(g.units, "units")?;
        i32_of(g.hw, "hw")?;
        i32_of(g.batch, "batch")?;
        i32_of(g.rotations, "rotations")?;
        let z = |len| self.exec.zeros_f64(len);
        let data = CudaVariance {
            vx_mean: z(g.vx_len())?,
            vx_m2: z(g.vx_len())?,
            vt_mean: z(g.vt_len())?,
            vt_m2: z(g.vt_len())?,
            sum_std: z(g.sum_len())?,
            vals: z(g.vt_len())?,
            labels: None,
            labels_host: Vec::new(),
        };
        Ok(VarianceState::new(*g, VarianceData::Cuda(Box::new(data))))
    }

    /// `Backend::variance_update`: reduce each unit's map, then fold the batch's rotation `j`
    /// into the accumulators (v2, or v1 with ROTVAR_VARIANCE_V1=1).
    pub(super) fn variance_fold(
        &self,
        st: &mut VarianceState,
        act: &Storage,
        n: usize,
        class: &[u32],
        rank: &[u32],
        j: usize,
    ) -> Result<()> {
        st.check_update(self.buf(act)?.len(), n, class, rank, j)?;
        self.variance_labels_to_device(st, class, rank)?;
        self.variance_launch(st, act, n, i32_of(j, "j")?, false)?;
        st.commit_update(class, rank, j);
        Ok(())
    }

    /// `Backend::variance_begin_fed`: the batch's labels checked and sent once; its m fed
    /// updates read them from the same buffer.
    pub(super) fn variance_fed_begin(&self, st: &mut VarianceState, class: &[u32], rank: &[u32]) -> Result<()> {
        st.begin_fed(class, rank)?;
        if let Err(e) = self.variance_labels_to_device(st, class, rank) {
            st.end_fed(false).ok();
            return Err(e);
        }
        Ok(())
    }

    /// `Backend::variance_update_fed`: the launches of `variance_fold` with j read from the
    /// counter on the device; nothing on the host, so the passes can be captured.
    pub(super) fn variance_fed_update(&self, st: &mut VarianceState, act: &Storage, counter: &Storage) -> Result<()> {
        let n = st.fed()?.class.len();
        let len = self.buf(act)?.len();
        if len != st.geom().act_len(n) {
            bail!("variance_update_fed: the activation has {len} values, not n·units·hw = {}", st.geom().act_len(n));
        }
        self.variance_launch(st, act, n, self.arg(counter, 1)?, true)
    }

    /// The label table of the batch about to be folded, uploaded in place unless it is already there.
    fn variance_labels_to_device(&self, st: &mut VarianceState, class: &[u32], rank: &[u32]) -> Result<()> {
        let classes = st.geom().classes;
        let VarianceData::Cuda(v) = &mut st.data else {
            bail!("variance_update: the state was created by another backend");
        };
        // check_update has verified every label < classes.
        let labels = variance_labels(class, rank, classes);
        if v.labels.is_none() || v.labels_host != labels {
            self.exec.upload_indices(&mut v.labels, &labels)?;
            v.labels_host = labels;
        }
        Ok(())
    }

    /// The reduce and update launches of one rotation of n samples; `j` is the rotation as an
    /// int argument, or (`fed`) the device counter it is read from.
    fn variance_launch(&self, st: &mut VarianceState, act: &Storage, n: usize, j: KArg, fed: bool) -> Result<()> {
        let g = *st.geom();
        let VarianceData::Cuda(v) = &mut st.data else {
            bail!("variance_update: the state was created by another backend");
        };
        let rows = n * g.units;
        let reduce = [
            self.exec.f64_ptr_mut(&mut v.vals),
            self.arg(act, g.act_len(n))?,
            KArg::I64(rows as i64),
            i32_of(g.hw, "hw")?,
            KArg::I32(g.reduce.code()),
        ];
        self.launch("variance_reduce_f64", self.thread_per_item_grid(rows), BLOCK, 0, &reduce)?;
        let lp = v.labels.as_ref().ok_or_else(|| anyhow::anyhow!("label buffer missing after upload"))?;
        let lp = self.exec.idx_ptr(lp);
        let mut update = vec![
            self.exec.f64_ptr_mut(&mut v.vx_mean),
            self.exec.f64_ptr_mut(&mut v.vx_m2),
            self.exec.f64_ptr_mut(&mut v.vt_mean),
            self.exec.f64_ptr_mut(&mut v.vt_m2),
            self.exec.f64_ptr_mut(&mut v.sum_std),
            self.exec.f64_ptr_mut(&mut v.vals),
            lp,
            i32_of(n, "n")?,
            i32_of(g.units, "units")?,
        ];
        let fed = if fed { "_fed" } else { "" };
        if self.variance_v1 {
            update.extend([i32_of(g.rotations, "rotations")?, j]);
            self.launch(&format!("variance_update_f64{fed}"), self.thread_per_item_grid(g.units), BLOCK, 0, &update)
        } else {
            let items = g.units * g.classes;
            i32_of(items, "units × classes")?;
            update.extend([i32_of(g.classes, "classes")?, i32_of(g.rotations, "rotations")?, j]);
            let name = format!("variance_update_f64_v2{fed}");
            self.launch(&name, self.thread_per_item_grid(items), BLOCK, 0, &update)
        }
    }

    /// `Backend::variance_read`: the accumulators, downloaded.
    pub(super) fn variance_moments(&self, st: &VarianceState) -> Result<VarianceMoments> {
        st.check_read()?;
        let g = st.geom();
        let VarianceData::Cuda(v) = &st.data else {
            bail!("variance_read: the state was created by another backend");
        };
        Ok(VarianceMoments {
            geom: *g,
            class_counts: st.class_counts().to_vec(),
            vx_mean: self.exec.download_f64(&v.vx_mean, g.vx_len())?,
            vx_m2: self.exec.download_f64(&v.vx_m2, g.vx_len())?,
            vt_sum_std: self.exec.download_f64(&v.sum_std, g.sum_len())?,
        })
    }
}
