//! The CPU backend: the reference implementation of every op, and the fallback without a GPU.
//!
//! Heavy ops live in their own files (`conv`, `pool`, `norm`, `gemm`); the light ones are here.
//! Parallel loops split work into pieces of a fixed size and reduce them in a fixed order, so a
//! result never depends on the number of threads.

pub mod buffers;
pub mod conv;
mod direct;
pub mod gemm;
#[cfg(target_arch = "x86_64")]
mod gemm_x86;
mod im2col;
pub mod isa;
pub mod norm;
pub mod pool;
pub mod rotate;
pub mod variance;
pub mod winograd;

use super::precision::{rounded, Precision};
use super::variance::VarianceData;
use super::{
    relu, Activation, AdamParams, Affine, Backend, BackendRef, ConvGeom, Device, Interp, NormGeom, PoolGeom, PoolKind,
    RotateGeom, SgdParams, Storage, VarianceGeom, VarianceMoments, VarianceState,
};
use crate::rng::{splitmix64, unit_f32};
use anyhow::{bail, Result};
use gemm::{sgemm, sgemm_packed_rhs, sgemm_prepacked, Mat, PackedLhs, PackedRhs, RhsOperand};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Elements per task in elementwise loops: large enough to amortize scheduling.
const EW_CHUNK: usize = 1 << 14;
/// Rows per task in the dense layers on the gemm crate; fixed because the crate's blocking, and
/// so its sums, may depend on the rows it is given.
const ROW_CHUNK: usize = 32;

/// Rows per task in a dense layer of `n` rows. rotvar's own GEMM (`own`) sums each output the
/// same way whatever the rows, so there the chunk follows the thread count: one chunk per thread
/// streams the packed weight (2 MB in LeNet's fc1, more than L2) once per thread, not once per
/// 32 rows.
fn dense_chunk(n: usize, own: bool) -> usize {
    if own {
        n.div_ceil(rayon::current_num_threads()).next_multiple_of(ROW_CHUNK).max(1)
    } else {
        ROW_CHUNK
    }
}

/// out[n×cols] = a[n×k] · b (k×cols, laid out as `lb`), parallel over chunks of rows; `epilogue`
/// gets each chunk of `out` right after its product. On rotvar's paths `b` (a dense layer's
/// weight) is read in place where it is row-major, else packed once for every chunk, not once
/// per chunk.
#[allow(clippy::too_many_arguments)]
fn dense_rows(
    n: usize,
    a: &[f32],
    k: usize,
    b: &[f32],
    lb: Mat,
    cols: usize,
    out: &mut [f32],
    epilogue: impl Fn(&mut [f32]) + Sync,
) {
    // A row-major b (the weight in backward-data) is read where it lies; a transposed one (the
    // forward's) is packed once.
    let packed = isa::active().map(|i| (i, (lb.cs != 1).then(|| PackedRhs::new(i, k, cols, b, lb))));
    let chunk = dense_chunk(n, packed.is_some());
    out[..n * cols].par_chunks_mut(chunk * cols).enumerate().for_each(|(c, oc)| {
        let rows = oc.len() / cols;
        let ac = &a[c * chunk * k..(c * chunk + rows) * k];
        match &packed {
            Some((i, bp)) => {
                let op = bp.as_ref().map_or(RhsOperand::Rows(b, lb.rs as usize), |p| p.operand());
                sgemm_packed_rhs(*i, rows, k, ac, Mat::rows(k), op, cols, oc, Mat::rows(cols), false)
            }
            None => sgemm(rows, cols, k, ac, Mat::rows(k), b, lb, oc, Mat::rows(cols), false),
        }
        epilogue(oc);
    });
}

/// Input columns per task in the dense layers' weight gradient.
const COL_CHUNK: usize = 192;

pub struct CpuBackend {
    precision: Precision,
}

impl CpuBackend {
    /// The fp32 backend.
    pub fn shared() -> BackendRef {
        Self::with_precision(Precision::Fp32)
    }

    /// One backend per precision; convolutions and dense layers round their operands as
    /// `precision.rs` says.
    pub fn with_precision(p: Precision) -> BackendRef {
        static CPU: [OnceLock<Arc<CpuBackend>>; 4] = [const { OnceLock::new() }; 4];
        CPU[p.code() as usize].get_or_init(|| Arc::new(CpuBackend { precision: p })).clone()
    }
}

const ON_GPU: &str = "a tensor on a GPU was passed to the CPU backend; download it first";

fn host(s: &Storage) -> Result<&[f32]> {
    match s {
        Storage::Cpu(v) => Ok(v),
        _ => bail!(ON_GPU),
    }
}

fn host_mut(s: &mut Storage) -> Result<&mut [f32]> {
    match s {
        Storage::Cpu(v) => Ok(v),
        _ => bail!(ON_GPU),
    }
}

fn same_len(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        bail!("{what}: buffer lengths differ ({a} vs {b})");
    }
    Ok(())
}

/// out[i] = f(a[i], b[i]), in parallel chunks.
/// ReLU's gradient from its output y and the incoming d.
pub(crate) fn relu_grad(y: f32, d: f32) -> f32 {
    if y > 0.0 {
        d
    } else {
        0.0
    }
}

/// The vector set of the elementwise loops: the GEMM path's, so a forced AVX2 holds here too.
/// Each value's arithmetic is its own, so the width cannot show in the bits (left at the build's
/// baseline, SSE2, they ran 4 values at a time).
fn ew_isa() -> isa::Isa {
    isa::active().unwrap_or_else(isa::Isa::best)
}

fn zip_map(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    let isa = ew_isa();
    out.par_chunks_mut(EW_CHUNK).enumerate().for_each(|(c, o)| {
        let base = c * EW_CHUNK;
        let (a, b) = (&a[base..base + o.len()], &b[base..base + o.len()]);
        isa::vectorized(
            isa,
            #[inline(always)]
            || o.iter_mut().zip(a).zip(b).for_each(|((v, &x), &y)| *v = f(x, y)),
        )
    });
}

fn map(a: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    let isa = ew_isa();
    out.par_chunks_mut(EW_CHUNK).enumerate().for_each(|(c, o)| {
        let a = &a[c * EW_CHUNK..c * EW_CHUNK + o.len()];
        isa::vectorized(
            isa,
            #[inline(always)]
            || o.iter_mut().zip(a).for_each(|(v, &x)| *v = f(x)),
        )
    });
}

/// [`norm::backward`] on host storages, through the fused ReLU's output `relu_y` where given.
fn batchnorm_backward(
    (x, gamma, mean, invstd): (&Storage, &Storage, &Storage, &Storage),
    relu_y: Option<&Storage>,
    dy: &Storage,
    (dx, dgamma, dbeta): (&mut Storage, &mut Storage, &mut Storage),
    g: &NormGeom,
) -> Result<()> {
    let relu_y = relu_y.map(host).transpose()?;
    let (dx, dgamma, dbeta) = (host_mut(dx)?, host_mut(dgamma)?, host_mut(dbeta)?);
    norm::backward(host(x)?, host(gamma)?, host(mean)?, host(invstd)?, relu_y, host(dy)?, dx, dgamma, dbeta, g);
    Ok(())
}

/// One thread of kernels/peak.cu `peak_fma_f32`, the same correctly rounded steps.
pub fn peak_fma_one(i: u64, a: f32, b: f32, iters: usize) -> f32 {
    let mut x: [f32; 8] = std::array::from_fn(|c| ((i + c as u64) % 97) as f32 * 0.01);
    for _ in 0..iters {
        for v in x.iter_mut() {
            *v = v.mul_add(a, b);
        }
    }
    x.iter().skip(1).fold(x[0], |s, v| s + v)
}

/// The dropout mask value for element `i`: a pure function of (seed, i), shared with the CUDA
/// kernel so both devices drop the same units.
pub fn dropout_keep_scale(seed: u64, i: u64, p: f32) -> f32 {
    let u = unit_f32(splitmix64(seed ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)));
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn describe(&self) -> String {
        let prec = match self.precision {
            Precision::Fp32 => String::new(),
            p => format!(", precision {p}"),
        };
        format!(
            "cpu ({} threads; {}, conv: {}{prec})",
            rayon::current_num_threads(),
            isa::describe(),
            conv::algo_name()
        )
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn zeros(&self, len: usize) -> Result<Storage> {
        Ok(Storage::Cpu(buffers::zeroed(len)))
    }

    fn alloc(&self, len: usize) -> Result<Storage> {
        Ok(Storage::Cpu(buffers::reused(len)))
    }

    fn upload(&self, host: &[f32]) -> Result<Storage> {
        let mut v = buffers::reused(host.len());
        v.copy_from_slice(host);
        Ok(Storage::Cpu(v))
    }

    fn download(&self, s: &Storage) -> Result<Vec<f32>> {
        Ok(host(s)?.to_vec())
    }

    fn copy(&self, x: &Storage, y: &mut Storage, len: usize) -> Result<()> {
        let (x, y) = (host(x)?, host_mut(y)?);
        if x.len() < len || y.len() < len {
            bail!("copy: buffers of {} and {} values where {len} are needed", x.len(), y.len());
        }
        y[..len].copy_from_slice(&x[..len]);
        Ok(())
    }

    fn gather_rows(&self, src: &Storage, row_len: usize, idx: &[u32], dst: &mut Storage) -> Result<()> {
        let (src, dst) = (host(src)?, host_mut(dst)?);
        same_len("gather_rows", dst.len(), idx.len() * row_len)?;
        let rows = src.len() / row_len.max(1);
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= rows) {
            bail!("gather_rows: row index {bad} out of range ({rows} rows)");
        }
        dst.par_chunks_mut(row_len.max(1)).zip(idx.par_iter()).for_each(|(d, &i)| {
            d.copy_from_slice(&src[i as usize * row_len..(i as usize + 1) * row_len]);
        });
        Ok(())
    }

    fn peak_fma(&self, out: &mut Storage, a: f32, b: f32, iters: usize) -> Result<()> {
        host_mut(out)?.par_chunks_mut(EW_CHUNK).enumerate().for_each(|(c, o)| {
            for (j, v) in o.iter_mut().enumerate() {
                *v = peak_fma_one((c * EW_CHUNK + j) as u64, a, b, iters);
            }
        });
        Ok(())
    }

    fn fill(&self, x: &mut Storage, value: f32) -> Result<()> {
        host_mut(x)?.fill(value);
        Ok(())
    }

    fn add(&self, a: &Storage, b: &Storage, act: Activation, out: &mut Storage) -> Result<()> {
        zip_map(host(a)?, host(b)?, host_mut(out)?, |a, b| act.apply(a + b));
        Ok(())
    }

    fn mul(&self, a: &Storage, b: &Storage, out: &mut Storage) -> Result<()> {
        zip_map(host(a)?, host(b)?, host_mut(out)?, |a, b| a * b);
        Ok(())
    }

    fn scale(&self, x: &Storage, alpha: f32, out: &mut Storage) -> Result<()> {
        map(host(x)?, host_mut(out)?, |v| v * alpha);
        Ok(())
    }

    fn accumulate(&self, acc: &mut Storage, x: &Storage) -> Result<()> {
        let (acc, x) = (host_mut(acc)?, host(x)?);
        same_len("accumulate", acc.len(), x.len())?;
        acc.par_chunks_mut(EW_CHUNK).zip(x.par_chunks(EW_CHUNK)).for_each(|(a, x)| {
            a.iter_mut().zip(x).for_each(|(a, x)| *a += x);
        });
        Ok(())
    }

    fn relu_fwd(&self, x: &Storage, y: &mut Storage) -> Result<()> {
        map(host(x)?, host_mut(y)?, relu);
        Ok(())
    }

    fn relu_bwd(&self, y: &Storage, dy: &Storage, dx: &mut Storage) -> Result<()> {
        zip_map(host(y)?, host(dy)?, host_mut(dx)?, relu_grad);
        Ok(())
    }

    fn relu_bwd_bias(&self, y: &Storage, dy: &Storage, g: &ConvGeom) -> Result<Option<(Storage, Storage)>> {
        let (mut dx, mut db) = (self.alloc(g.out_len())?, self.alloc(g.c_out)?);
        conv::relu_and_bias_grad(host(y)?, host(dy)?, host_mut(&mut dx)?, host_mut(&mut db)?, g);
        Ok(Some((dx, db)))
    }

    fn pool_relu_bwd_bias(
        &self,
        kind: PoolKind,
        y: &Storage,
        dp: &Storage,
        g: &PoolGeom,
    ) -> Result<Option<(Storage, Storage)>> {
        let (mut dz, mut db) = (self.alloc(g.in_len())?, self.alloc(g.c)?);
        pool::backward_relu_bias(kind, host(y)?, host(dp)?, host_mut(&mut dz)?, host_mut(&mut db)?, g);
        Ok(Some((dz, db)))
    }

    fn elu_fwd(&self, x: &Storage, alpha: f32, y: &mut Storage) -> Result<()> {
        map(host(x)?, host_mut(y)?, |v| if v > 0.0 { v } else { alpha * v.exp_m1() });
        Ok(())
    }

    fn elu_bwd(&self, x: &Storage, y: &Storage, dy: &Storage, alpha: f32, dx: &mut Storage) -> Result<()> {
        let (x, y, dy, dx) = (host(x)?, host(y)?, host(dy)?, host_mut(dx)?);
        dx.par_chunks_mut(EW_CHUNK).enumerate().for_each(|(c, o)| {
            let base = c * EW_CHUNK;
            for (i, v) in o.iter_mut().enumerate() {
                let j = base + i;
                // for x ≤ 0, d/dx α(eˣ−1) = αeˣ = y + α
                *v = if x[j] > 0.0 { dy[j] } else { dy[j] * (y[j] + alpha) };
            }
        });
        Ok(())
    }

    fn dropout_fwd(&self, x: &Storage, p: f32, seed: u64, y: &mut Storage, mask: &mut Storage) -> Result<()> {
        let (x, y, mask) = (host(x)?, host_mut(y)?, host_mut(mask)?);
        mask.par_chunks_mut(EW_CHUNK).enumerate().for_each(|(c, m)| {
            for (i, v) in m.iter_mut().enumerate() {
                *v = dropout_keep_scale(seed, (c * EW_CHUNK + i) as u64, p);
            }
        });
        zip_map(x, mask, y, |a, b| a * b);
        Ok(())
    }

    fn linear_fwd(
        &self,
        x: &Storage,
        w: &Storage,
        b: Option<&Storage>,
        act: Activation,
        y: &mut Storage,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        let (x, w, y) = (rounded(self.precision, host(x)?), rounded(self.precision, host(w)?), host_mut(y)?);
        let (x, w) = (&x[..], &w[..]);
        let b = b.map(host).transpose()?;
        dense_rows(n, x, k, w, Mat::transposed(k), m, y, |yc| {
            // The epilogue while the chunk is still in cache.
            for row in yc.chunks_mut(m) {
                match b {
                    Some(b) => row.iter_mut().zip(b).for_each(|(v, b)| *v = act.apply(*v + b)),
                    None if act != Activation::Identity => row.iter_mut().for_each(|v| *v = act.apply(*v)),
                    None => {}
                }
            }
        });
        Ok(())
    }

    fn linear_bwd_data(&self, dy: &Storage, w: &Storage, dx: &mut Storage, n: usize, k: usize, m: usize) -> Result<()> {
        let (dy, w, dx) = (rounded(self.precision, host(dy)?), rounded(self.precision, host(w)?), host_mut(dx)?);
        let (dy, w) = (&dy[..], &w[..]);
        dense_rows(n, dy, m, w, Mat::rows(k), k, dx, |_| {});
        Ok(())
    }

    fn linear_bwd_weight(
        &self,
        x: &Storage,
        dy: &Storage,
        dw: &mut Storage,
        db: Option<&mut Storage>,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        let (x, dy, dw) = (host(x)?, host(dy)?, host_mut(dw)?);
        // The bias gradient below sums the unrounded dy.
        let (xr, dyr) = (rounded(self.precision, x), rounded(self.precision, dy));
        let (xr, dyr) = (&xr[..], &dyr[..]);
        // Split over blocks of input columns (never over the batch), so each weight's sum has one
        // fixed order. Columns, not output rows: a layer has few outputs (84 in LeNet's fc1,
        // three row blocks for two threads) but thousands of inputs.
        // On rotvar's paths dyᵀ is packed once for every block, and x read where it lies (packing
        // both per block was a third of the pass).
        let packed = isa::active().map(|i| (i, PackedLhs::new(i, m, n, dyr, Mat::transposed(m))));
        let blocks: Vec<Vec<f32>> = (0..k.div_ceil(COL_CHUNK))
            .into_par_iter()
            .map(|c| {
                let (c0, cols) = (c * COL_CHUNK, COL_CHUNK.min(k - c * COL_CHUNK));
                // Recycled, and not zeroed: the GEMM overwrites it.
                let mut block = buffers::reused(m * cols);
                let (xc, out) = (&xr[c0..], Mat::rows(cols));
                match &packed {
                    Some((i, pa)) => sgemm_prepacked(
                        *i,
                        m,
                        cols,
                        &pa.data,
                        pa.layout,
                        RhsOperand::Rows(xc, k),
                        &mut block,
                        out,
                        false,
                    ),
                    None => sgemm(m, cols, n, dyr, Mat::transposed(m), xc, Mat::rows(k), &mut block, out, false),
                }
                block
            })
            .collect();
        // Into place row by row on both cores (serially it left the other core idle).
        dw.par_chunks_mut(k.max(1)).enumerate().for_each(|(row, dst)| {
            for (c, block) in blocks.iter().enumerate() {
                let cols = block.len() / m.max(1);
                dst[c * COL_CHUNK..c * COL_CHUNK + cols].copy_from_slice(&block[row * cols..(row + 1) * cols]);
            }
        });
        blocks.into_iter().for_each(buffers::recycle);
        if let Some(db) = db {
            let db = host_mut(db)?;
            db.par_iter_mut().enumerate().for_each(|(j, d)| {
                *d = (0..n).map(|i| dy[i * m + j] as f64).sum::<f64>() as f32;
            });
        }
        Ok(())
    }

    fn conv2d_fwd(
        &self,
        x: &Storage,
        w: &Storage,
        b: Option<&Storage>,
        act: Activation,
        y: &mut Storage,
        g: &ConvGeom,
    ) -> Result<()> {
        let b = b.map(host).transpose()?;
        let p = self.precision;
        conv::forward(&rounded(p, host(x)?), &rounded(p, host(w)?), b, act, host_mut(y)?, g);
        Ok(())
    }

    fn conv2d_bwd_data(&self, dy: &Storage, w: &Storage, dx: &mut Storage, g: &ConvGeom) -> Result<()> {
        let p = self.precision;
        conv::backward_data(&rounded(p, host(dy)?), &rounded(p, host(w)?), host_mut(dx)?, g);
        Ok(())
    }

    fn conv2d_bwd_weight(
        &self,
        x: &Storage,
        dy: &Storage,
        dw: &mut Storage,
        db: Option<&mut Storage>,
        g: &ConvGeom,
    ) -> Result<()> {
        let db = db.map(host_mut).transpose()?;
        let (x, dy, p) = (host(x)?, host(dy)?, self.precision);
        conv::backward_weight(&rounded(p, x), &rounded(p, dy), host_mut(dw)?, None, g);
        if let Some(db) = db {
            conv::bias_grad(dy, db, g); // of the unrounded dy
        }
        Ok(())
    }

    fn conv2d_bwd_data_and_weight(
        &self,
        x: &Storage,
        dy: &Storage,
        w: &Storage,
        dx: &mut Storage,
        dw: &mut Storage,
        db: Option<&mut Storage>,
        g: &ConvGeom,
    ) -> Result<()> {
        let db = db.map(host_mut).transpose()?;
        let p = self.precision;
        let (x, dy_r, w) = (rounded(p, host(x)?), rounded(p, host(dy)?), rounded(p, host(w)?));
        conv::backward_data_and_weight(&x, &dy_r, &w, host_mut(dx)?, host_mut(dw)?, None, g);
        if let Some(db) = db {
            conv::bias_grad(host(dy)?, db, g); // of the unrounded dy
        }
        Ok(())
    }

    fn pool2d_fwd(&self, kind: PoolKind, x: &Storage, y: &mut Storage, g: &PoolGeom) -> Result<()> {
        pool::forward(kind, host(x)?, host_mut(y)?, g);
        Ok(())
    }

    fn pool2d_bwd(&self, kind: PoolKind, x: &Storage, dy: &Storage, dx: &mut Storage, g: &PoolGeom) -> Result<()> {
        pool::backward(kind, host(x)?, host(dy)?, host_mut(dx)?, g);
        Ok(())
    }

    fn warp(
        &self,
        x: &Storage,
        mats: &[Affine],
        interp: Interp,
        fill: &[f32],
        y: &mut Storage,
        g: &RotateGeom,
    ) -> Result<()> {
        g.check(mats, fill)?;
        let (x, y) = (host(x)?, host_mut(y)?);
        if x.len() < g.len() || y.len() < g.len() {
            bail!("warp: buffers of {} and {} values where {} are needed", x.len(), y.len(), g.len());
        }
        rotate::warp(&x[..g.len()], mats, interp, fill, &mut y[..g.len()], g);
        Ok(())
    }

    fn variance_init(&self, g: &VarianceGeom) -> Result<VarianceState> {
        g.check()?;
        Ok(VarianceState::new(*g, VarianceData::Cpu(variance::CpuVariance::zeros(g))))
    }

    fn variance_update(
        &self,
        st: &mut VarianceState,
        act: &Storage,
        n: usize,
        class: &[u32],
        rank: &[u32],
        j: usize,
    ) -> Result<()> {
        let act = host(act)?;
        st.check_update(act.len(), n, class, rank, j)?;
        let g = *st.geom();
        match &mut st.data {
            VarianceData::Cpu(v) => v.update(&g, act, n, class, rank, j),
            _ => bail!("variance_update: the state was created by another backend"),
        }
        st.commit_update(class, rank, j);
        Ok(())
    }

    fn variance_read(&self, st: &VarianceState) -> Result<VarianceMoments> {
        st.check_read()?;
        match &st.data {
            VarianceData::Cpu(v) => Ok(v.read(st.geom(), st.class_counts().to_vec())),
            _ => bail!("variance_read: the state was created by another backend"),
        }
    }

    fn batchnorm_fwd_train(
        &self,
        x: &Storage,
        gamma: &Storage,
        beta: &Storage,
        act: Activation,
        y: &mut Storage,
        save_mean: &mut Storage,
        save_invstd: &mut Storage,
        running_mean: &mut Storage,
        running_var: &mut Storage,
        momentum: f32,
        eps: f32,
        g: &NormGeom,
    ) -> Result<()> {
        let x = host(x)?;
        let (gamma, beta) = (host(gamma)?, host(beta)?);
        let stats = norm::stats(x, g);
        let (sm, si) = (host_mut(save_mean)?, host_mut(save_invstd)?);
        let (rm, rv) = (host_mut(running_mean)?, host_mut(running_var)?);
        let count = g.count() as f64;
        let mut scale = vec![0.0f32; g.c];
        for (c, &(mean, var)) in stats.iter().enumerate() {
            sm[c] = mean as f32;
            si[c] = (1.0 / (var + eps as f64).sqrt()) as f32;
            scale[c] = gamma[c] * si[c];
            let unbiased = if count > 1.0 { var * count / (count - 1.0) } else { var };
            rm[c] = (1.0 - momentum) * rm[c] + momentum * mean as f32;
            rv[c] = (1.0 - momentum) * rv[c] + momentum * unbiased as f32;
        }
        norm::normalize(x, sm, &scale, beta, act, host_mut(y)?, g);
        Ok(())
    }

    fn batchnorm_fwd_eval(
        &self,
        x: &Storage,
        gamma: &Storage,
        beta: &Storage,
        running_mean: &Storage,
        running_var: &Storage,
        act: Activation,
        y: &mut Storage,
        eps: f32,
        g: &NormGeom,
    ) -> Result<()> {
        let (gamma, rm, rv) = (host(gamma)?, host(running_mean)?, host(running_var)?);
        let scale: Vec<f32> = (0..g.c).map(|c| gamma[c] / (rv[c] + eps).sqrt()).collect();
        norm::normalize(host(x)?, rm, &scale, host(beta)?, act, host_mut(y)?, g);
        Ok(())
    }

    fn batchnorm_bwd(
        &self,
        x: &Storage,
        gamma: &Storage,
        save_mean: &Storage,
        save_invstd: &Storage,
        dy: &Storage,
        dx: &mut Storage,
        dgamma: &mut Storage,
        dbeta: &mut Storage,
        g: &NormGeom,
    ) -> Result<()> {
        batchnorm_backward((x, gamma, save_mean, save_invstd), None, dy, (dx, dgamma, dbeta), g)
    }

    fn batchnorm_relu_bwd(
        &self,
        x: &Storage,
        gamma: &Storage,
        save_mean: &Storage,
        save_invstd: &Storage,
        y: &Storage,
        dy: &Storage,
        dx: &mut Storage,
        dgamma: &mut Storage,
        dbeta: &mut Storage,
        g: &NormGeom,
    ) -> Result<()> {
        batchnorm_backward((x, gamma, save_mean, save_invstd), Some(y), dy, (dx, dgamma, dbeta), g)
    }

    fn log_softmax_fwd(&self, x: &Storage, y: &mut Storage, _rows: usize, cols: usize) -> Result<()> {
        let (x, y) = (host(x)?, host_mut(y)?);
        y.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(yr, xr)| {
            let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + xr.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln() as f32;
            yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = v - lse);
        });
        Ok(())
    }

    fn log_softmax_bwd(&self, y: &Storage, dy: &Storage, dx: &mut Storage, _rows: usize, cols: usize) -> Result<()> {
        let (y, dy, dx) = (host(y)?, host(dy)?, host_mut(dx)?);
        dx.par_chunks_mut(cols).enumerate().for_each(|(r, dxr)| {
            let (yr, dyr) = (&y[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
            let s: f32 = dyr.iter().sum();
            for j in 0..cols {
                dxr[j] = dyr[j] - yr[j].exp() * s;
            }
        });
        Ok(())
    }

    fn nll_fwd(&self, logp: &Storage, labels: &Storage, loss: &mut Storage, rows: usize, cols: usize) -> Result<()> {
        let (logp, labels) = (host(logp)?, host(labels)?);
        let mut s = 0.0f64;
        for (i, &l) in labels.iter().enumerate().take(rows) {
            let l = l as usize;
            if l >= cols {
                bail!("nll: label {l} out of range for {cols} classes");
            }
            s += logp[i * cols + l] as f64;
        }
        host_mut(loss)?[0] = (-s / rows as f64) as f32;
        Ok(())
    }

    fn nll_bwd(&self, labels: &Storage, dloss: &Storage, dlogp: &mut Storage, rows: usize, cols: usize) -> Result<()> {
        let (labels, d, out) = (host(labels)?, host(dloss)?[0], host_mut(dlogp)?);
        out.fill(0.0);
        for (i, &l) in labels.iter().enumerate().take(rows) {
            out[i * cols + l as usize] = -d / rows as f32;
        }
        Ok(())
    }

    fn sum(&self, x: &Storage, out: &mut Storage) -> Result<()> {
        host_mut(out)?[0] = host(x)?.iter().map(|&v| v as f64).sum::<f64>() as f32;
        Ok(())
    }

    fn broadcast_scalar(&self, dy: &Storage, alpha: f32, dx: &mut Storage) -> Result<()> {
        let v = host(dy)?[0] * alpha;
        host_mut(dx)?.fill(v);
        Ok(())
    }

    fn argmax_rows(&self, x: &Storage, out: &mut Storage, _rows: usize, cols: usize) -> Result<()> {
        let (x, out) = (host(x)?, host_mut(out)?);
        for (o, r) in out.iter_mut().zip(x.chunks(cols)) {
            let mut best = 0;
            for j in 1..cols {
                if r[j] > r[best] {
                    best = j;
                }
            }
            *o = best as f32;
        }
        Ok(())
    }

    fn adam_step(
        &self,
        p: &mut Storage,
        grad: &Storage,
        m: &mut Storage,
        v: &mut Storage,
        h: &AdamParams,
    ) -> Result<()> {
        adam_apply(host_mut(p)?, host(grad)?, host_mut(m)?, host_mut(v)?, &h.scalars(), h.weight_decay);
        Ok(())
    }

    fn sgd_step(&self, p: &mut Storage, grad: &Storage, velocity: &mut Storage, h: &SgdParams) -> Result<()> {
        let (p, g, vel) = (host_mut(p)?, host(grad)?, host_mut(velocity)?);
        p.par_chunks_mut(EW_CHUNK).zip(vel.par_chunks_mut(EW_CHUNK)).zip(g.par_chunks(EW_CHUNK)).for_each(
            |((p, vel), g)| {
                for i in 0..p.len() {
                    let gi = g[i] + h.weight_decay * p[i];
                    vel[i] = h.momentum * vel[i] + gi;
                    p[i] -= h.lr * vel[i];
                }
            },
        );
        Ok(())
    }
}

/// One Adam update of a tensor from the step's scalars ([`AdamParams::scalars`]), in the same
/// arithmetic and order as torch.optim.Adam's single-tensor path.
pub fn adam_apply(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &[f32; 6], weight_decay: f32) {
    let [step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt] = *s;
    p.par_chunks_mut(EW_CHUNK)
        .zip(m.par_chunks_mut(EW_CHUNK))
        .zip(v.par_chunks_mut(EW_CHUNK))
        .zip(g.par_chunks(EW_CHUNK))
        .for_each(|(((p, m), v), g)| {
            isa::vectorized(
                ew_isa(),
                #[inline(always)]
                || {
                    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                        let gi = g + weight_decay * *p;
                        *m += (gi - *m) * one_minus_beta1;
                        *v = *v * beta2 + one_minus_beta2 * gi * gi;
                        let denom = v.sqrt() / bc2_sqrt + eps;
                        *p -= step_size * *m / denom;
                    }
                },
            )
        });
}
