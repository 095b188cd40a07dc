//! Inference passes of one shape replayed as one graph: the rotated evaluation's passes.
//!
//! The mechanism is the training step's (feed.rs): each pass's values (which dataset rows its
//! copies are, under which sampling matrices) sit in device tables with one row per pass, and
//! a device counter names the pass. A pass stages its row, gathers and warps its copies, runs
//! the model in eval mode and stores the log-probabilities into a log that the host reads once
//! per group of passes, rather than once per pass. The first pass runs plain (it fills the
//! buffer pool), the second is captured and replayed, the rest are replays.

use super::feed::{self, Mode, Replayer};
use super::DeviceDataset;
use crate::backend::{Affine, BackendRef, Interp};
use crate::models::Model;
use crate::nn::Forward;
use crate::ops;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// One pass: copy c is dataset row `rows[c]` under sampling matrix `mats[c]`.
pub struct Pass {
    pub rows: Vec<u32>,
    pub mats: Vec<Affine>,
}

pub struct FedPasses {
    be: BackendRef,
    copies: usize,
    capacity: usize,
    classes: usize,
    rows: Tensor,
    mats: Tensor,
    counter: Tensor,
    cur_rows: Tensor,
    cur_mats: Tensor,
    fill: Tensor,
    log: Tensor,
    replayer: Replayer,
}

impl FedPasses {
    /// Passes of `copies` images over `data`, up to `capacity` per [`FedPasses::run`]; `None`
    /// where the backend has no graphs or the process runs the host loop (`feed::Mode::Host`).
    pub fn new(data: &DeviceDataset, copies: usize, capacity: usize) -> Result<Option<FedPasses>> {
        let be = data.images.backend().clone();
        let mode = feed::mode();
        if be.graph_replays().is_none() || mode == Mode::Host || copies == 0 || capacity == 0 {
            return Ok(None);
        }
        let z = |n: usize| Tensor::zeros(&be, &[n]);
        Ok(Some(FedPasses {
            rows: z(capacity * copies)?,
            mats: z(capacity * copies * 6)?,
            counter: z(1)?,
            cur_rows: z(copies)?,
            cur_mats: z(copies * 6)?,
            fill: Tensor::from_vec(&be, &[data.fill.len()], &data.fill)?,
            log: z(capacity * copies * data.num_classes)?,
            replayer: Replayer::new(mode, 1, "the rotated evaluation"),
            classes: data.num_classes,
            copies,
            capacity,
            be,
        }))
    }

    pub fn copies(&self) -> usize {
        self.copies
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The log-probabilities [copies × classes] of each pass, in order.
    pub fn run(&mut self, model: &Model, data: &DeviceDataset, passes: &[&Pass]) -> Result<Vec<Vec<f32>>> {
        if passes.len() > self.capacity
            || passes.iter().any(|p| p.rows.len() != self.copies || p.mats.len() != self.copies)
        {
            bail!("internal: fed passes of the wrong shape or too many of them");
        }
        if let Some(&bad) = passes.iter().flat_map(|p| &p.rows).find(|&&r| r as usize >= data.len()) {
            bail!("evaluate: image {bad} of a dataset of {}", data.len());
        }
        if passes.iter().flat_map(|p| p.mats.iter().flatten()).any(|v| !v.is_finite()) {
            bail!("evaluate: a sampling matrix that is not finite");
        }
        let words: Vec<f32> = passes.iter().flat_map(|p| p.rows.iter().map(|&r| f32::from_bits(r))).collect();
        self.be.upload_into(&mut self.rows.storage_mut(), &words)?;
        let mats: Vec<f32> = passes.iter().flat_map(|p| p.mats.iter().flatten().copied()).collect();
        self.be.upload_into(&mut self.mats.storage_mut(), &mats)?;
        self.be.upload_into(&mut self.counter.storage_mut(), &[0.0])?;
        let be = self.be.clone();
        let mut replayer = std::mem::replace(&mut self.replayer, Replayer::new(Mode::Plain, 0, ""));
        let ran = (0..passes.len()).try_for_each(|_| replayer.run(&be, &mut || self.record(model, data)));
        self.replayer = replayer;
        ran?;
        let log = self.log.to_vec()?;
        let per = self.copies * self.classes;
        Ok(log.chunks(per).take(passes.len()).map(<[f32]>::to_vec).collect())
    }

    /// One pass's launches.
    fn record(&self, model: &Model, data: &DeviceDataset) -> Result<()> {
        let (be, n, cap) = (&self.be, self.copies, self.capacity);
        let counter = self.counter.storage();
        be.feed_stage(&self.rows.storage(), cap, &counter, &mut self.cur_rows.storage_mut(), n)?;
        be.feed_stage(&self.mats.storage(), cap, &counter, &mut self.cur_mats.storage_mut(), 6 * n)?;
        let [c, h, w] = data.item_shape;
        let mut xs = be.alloc(n * c * h * w)?;
        be.gather_rows_fed(&data.images.storage(), c * h * w, &self.cur_rows.storage(), n, &mut xs)?;
        let x = Tensor::from_storage(be, &[n, c, h, w], xs, false)?;
        let x = ops::warp_fed(&x, &self.cur_mats, Interp::Bilinear, &self.fill)?;
        let logp = model.forward(&x, &mut Forward::eval())?;
        be.feed_store(&logp.storage(), &counter, &mut self.log.storage_mut(), cap, n * self.classes)?;
        drop(counter);
        be.feed_advance(&mut self.counter.storage_mut())
    }
}
