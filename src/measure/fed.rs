//! The measure's passes replayed as one graph: a batch's m transformed passes differ only in
//! the transformation j, so j is fed from the device.
//!
//! Per full batch the host gathers the batch into a fixed input buffer, begins the batch in
//! every layer's state (`Backend::variance_begin_fed`: the labels go to the device once) and
//! resets a one-word counter. Each pass then stages matrix row j (= the counter) of a table
//! holding every transformation, warps the batch, runs the model in eval mode and folds each
//! observed intermediate with `variance_update_fed`, which reads j from the same counter; its
//! last kernel advances the counter. The measure's first pass runs plain (it creates the
//! layers' states and fills the buffer pool), the second is captured, every later full-batch
//! pass is one replay. A partial last batch has other shapes and runs plain (stream.rs).
//! ROTVAR_CUDA_GRAPHS=0 runs the same fed passes with plain launches, for comparison.

use crate::backend::{Affine, BackendRef, Interp};
use crate::models::Model;
use crate::nn::Forward;
use crate::ops;
use crate::tensor::Tensor;
use crate::train::feed::{self, Mode, Replayer};
use crate::train::DeviceDataset;
use anyhow::Result;

/// Observer of a fed pass: (position, name, intermediate, the device counter holding j).
pub type FedObserver<'a> = dyn FnMut(usize, &str, &Tensor, &Tensor) -> Result<()> + 'a;

pub struct MeasureFeed {
    be: BackendRef,
    /// Transformations: the table's rows.
    m: usize,
    /// The current batch, gathered in place so that a replay reads it.
    x: Tensor,
    /// Row j: transformation j's matrix once per sample of the batch.
    mats: Tensor,
    cur_mats: Tensor,
    counter: Tensor,
    fill: Tensor,
    replayer: Replayer,
}

impl MeasureFeed {
    /// A feed for full batches of `batch` samples under `mats`, or `None` where the backend has
    /// no graphs (the CPU) or the process runs the host loop (`feed::Mode::Host`).
    pub fn new(data: &DeviceDataset, batch: usize, mats: &[Affine], fill: &[f32]) -> Result<Option<MeasureFeed>> {
        let be = data.images.backend().clone();
        let mode = feed::mode();
        if be.graph_replays().is_none() || mode == Mode::Host || batch == 0 || mats.is_empty() {
            return Ok(None);
        }
        let [c, h, w] = data.item_shape;
        let table: Vec<f32> = mats.iter().flat_map(|m| std::iter::repeat_n(m, batch).flatten().copied()).collect();
        Ok(Some(MeasureFeed {
            x: Tensor::zeros(&be, &[batch, c, h, w])?,
            mats: Tensor::from_vec(&be, &[table.len()], &table)?,
            cur_mats: Tensor::zeros(&be, &[batch * 6])?,
            counter: Tensor::zeros(&be, &[1])?,
            fill: Tensor::from_vec(&be, &[fill.len()], fill)?,
            replayer: Replayer::new(mode, 1, "the measure"),
            m: mats.len(),
            be,
        }))
    }

    /// Gather the samples `idx` (a full batch) as the next passes' input; j starts at 0.
    pub fn load(&mut self, data: &DeviceDataset, idx: &[u32]) -> Result<()> {
        let [c, h, w] = data.item_shape;
        self.be.gather_rows(&data.images.storage(), c * h * w, idx, &mut self.x.storage_mut())?;
        self.be.upload_into(&mut self.counter.storage_mut(), &[0.0])
    }

    /// Run the next pass: plain, captured and replayed, or replayed. `Some(count)`: the pass
    /// was recorded (plain or captured) and reported `count` intermediates to `observe`;
    /// `None`: it was a replay, which calls nothing on the host.
    pub fn pass(&mut self, model: &Model, observe: &mut FedObserver<'_>) -> Result<Option<usize>> {
        let be = self.be.clone();
        let mut replayer = std::mem::replace(&mut self.replayer, Replayer::new(Mode::Plain, 0, ""));
        let mut reported = None;
        let ran = replayer.run(&be, &mut || {
            reported = Some(self.record(model, observe)?);
            Ok(())
        });
        self.replayer = replayer;
        ran?;
        Ok(reported)
    }

    /// One pass's launches; returns how many intermediates were observed.
    fn record(&self, model: &Model, observe: &mut FedObserver<'_>) -> Result<usize> {
        let be = &self.be;
        let batch = self.x.dim(0);
        be.feed_stage(
            &self.mats.storage(),
            self.m,
            &self.counter.storage(),
            &mut self.cur_mats.storage_mut(),
            6 * batch,
        )?;
        let xr = ops::warp_fed(&self.x, &self.cur_mats, Interp::Bilinear, &self.fill)?;
        let mut pos = 0;
        let mut each = |name: &str, t: &Tensor| -> Result<()> {
            observe(pos, name, t, &self.counter)?;
            pos += 1;
            Ok(())
        };
        model.forward(&xr, &mut Forward::observe(&mut each))?;
        be.feed_advance(&mut self.counter.storage_mut())?;
        Ok(pos)
    }
}
