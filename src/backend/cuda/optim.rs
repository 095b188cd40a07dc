//! The optimizer steps of the CUDA backend: Adam per tensor and over every tensor in one launch
//! (with the multi-tensor address table it keeps on the device), and SGD with momentum.

use super::emu::KArg;
use super::{device, i32_of, CudaBackend, BLOCK};
use crate::backend::{AdamParams, AdamTensor, SgdParams, Storage};
use anyhow::{bail, Result};

/// The device copy of multi-tensor Adam's table and the host table it holds. The parameters,
/// gradients and moments stay at the same addresses from step to step, so the table is sent again
/// only when the parameter set changes, not once per step from pageable memory.
#[derive(Default)]
pub(super) struct AdamTable {
    pub host: Vec<u32>,
    pub dev: Option<device::IdxBuf>,
    pub uploads: u64,
}

/// Where a multi-tensor Adam step takes its scalars ([`AdamParams::scalars`]) from.
pub(super) enum AdamScalars<'a> {
    Host(&'a AdamParams),
    /// Six values on the device, staged there by the training step's feed.
    Device(&'a Storage),
}

impl CudaBackend {
    /// `Backend::adam_step`: one tensor, kernels/elementwise.cu's adam_update_f32.
    pub(super) fn adam_one(
        &self,
        p: &mut Storage,
        grad: &Storage,
        m: &mut Storage,
        v: &mut Storage,
        h: &AdamParams,
    ) -> Result<()> {
        let n = self.buf(p)?.len();
        let [step_size, omb1, beta2, omb2, eps, bc2_sqrt] = h.scalars().map(KArg::F32);
        let args = vec![
            self.arg(p, n)?,
            self.arg(grad, n)?,
            self.arg(m, n)?,
            self.arg(v, n)?,
            step_size,
            omb1,
            beta2,
            omb2,
            eps,
            KArg::F32(h.weight_decay),
            bc2_sqrt,
        ];
        self.ew("adam_update_f32", n, args)
    }

    /// Every tensor's Adam step in one launch (adam_multi_f32), its step scalars as kernel
    /// arguments or, for a step replayed as a graph, read from the device (adam_multi_fed_f32).
    pub(super) fn adam_multi(&self, tensors: &[AdamTensor<'_>], scalars: AdamScalars<'_>) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let (table, blocks) = self.adam_records(tensors)?;
        let mut args = vec![self.adam_table_arg(table)?, i32_of(tensors.len(), "parameter tensors")?];
        let name = match scalars {
            AdamScalars::Host(h) => {
                args.extend(h.scalars().map(KArg::F32));
                "adam_multi_f32"
            }
            AdamScalars::Device(s) => {
                args.push(self.arg(s, 6)?);
                "adam_multi_fed_f32"
            }
        };
        self.launch(name, (blocks, 1, 1), BLOCK, 0, &args)
    }

    /// `Backend::sgd_step`: sgd_momentum_update_f32.
    pub(super) fn sgd(&self, p: &mut Storage, grad: &Storage, velocity: &mut Storage, h: &SgdParams) -> Result<()> {
        let n = self.buf(p)?.len();
        // Velocity starts at zero, so momentum·0 + g equals torch's first-step copy: first_step = 0.
        let args = vec![
            self.arg(p, n)?,
            self.arg(grad, n)?,
            self.arg(velocity, n)?,
            KArg::F32(h.lr),
            KArg::F32(h.momentum),
            KArg::F32(0.0),
            KArg::F32(h.weight_decay),
            KArg::I32(0),
            KArg::I32(0),
        ];
        self.ew("sgd_momentum_update_f32", n, args)
    }

    /// The multi-tensor Adam table's records for `tensors` (kernels/elementwise.cu's
    /// adam_multi_f32: four addresses, n, first block, weight decay, in 32-bit words) and the
    /// launch's block count.
    fn adam_records(&self, tensors: &[AdamTensor<'_>]) -> Result<(Vec<u32>, u32)> {
        let mut table: Vec<u32> = Vec::with_capacity(12 * tensors.len());
        let mut blocks = 0u32;
        for t in tensors.iter() {
            let n = self.buf(t.param)?.len();
            let mut words = |k: KArg| match k {
                KArg::Ptr(a) => {
                    table.extend([a as u32, (a >> 32) as u32]);
                    Ok(())
                }
                _ => bail!("internal: a buffer argument that is not an address"),
            };
            words(self.arg(t.param, n)?)?;
            words(self.arg(t.grad, n)?)?;
            words(self.arg(t.m, n)?)?;
            words(self.arg(t.v, n)?)?;
            table.extend([n as u32, (n as u64 >> 32) as u32, blocks, t.weight_decay.to_bits()]);
            // About four elements per thread, at most 512 blocks a tensor: enough to fill the GPU
            // on the big tensors, one block for a bias.
            blocks += n.div_ceil(4 * BLOCK.0 as usize).clamp(1, 512) as u32;
        }
        Ok((table, blocks))
    }

    /// The device address of an Adam table holding `table`. Outside capture: the backend's
    /// table, sent again only when the parameter set (or a gradient's address) changes. Inside:
    /// the graph's own table, which is written once capture ends (graph.rs).
    fn adam_table_arg(&self, table: Vec<u32>) -> Result<KArg> {
        if let Some(c) = self.capture.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let t = c.adam_table.as_ref().filter(|t| t.len() >= table.len()).ok_or_else(|| {
                anyhow::anyhow!("the graph's Adam table is smaller than the step's; run a plain step before capturing")
            })?;
            let p = self.exec.idx_ptr(t);
            c.adam_words = Some(table);
            return Ok(p);
        }
        let mut slot = self.adam_table.lock().unwrap_or_else(|e| e.into_inner());
        if slot.dev.is_none() || slot.host != table {
            self.exec.upload_indices(&mut slot.dev, &table)?;
            slot.host = table;
            slot.uploads += 1;
        }
        let d = slot.dev.as_ref().ok_or_else(|| anyhow::anyhow!("Adam table missing after upload"))?;
        Ok(self.exec.idx_ptr(d))
    }
}
