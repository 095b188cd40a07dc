//! The backend boundary: one trait, one method per op.
//!
//! Every op works on flat f32 storages plus the geometry it needs; tensors, shapes and autograd
//! live above this line (`tensor.rs`, `ops/`). The CPU backend (`cpu/`) is the readable
//! reference for every op and the fallback on machines without a GPU; the CUDA backend
//! implements the same trait with hand-written kernels. Outputs are always written in full:
//! an op never relies on the previous contents of its output buffer (gradient accumulation is an
//! explicit op, `accumulate`).

pub mod cpu;
pub mod cuda;
pub mod geom;
pub mod precision;
pub mod variance;

pub use geom::*;
pub use precision::Precision;
pub use variance::{class_ranks, MapReduce, VarianceGeom, VarianceMoments, VarianceState};

use anyhow::{bail, Result};
use std::fmt;
use std::sync::Arc;

/// Where a tensor's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// What the user asked for on the command line: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
    /// The CUDA backend with its kernels run by the host emulator: slow, for checking the GPU
    /// code path on a machine without a GPU.
    CudaEmulated,
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda(0)),
            "cuda-emu" => Ok(DeviceRequest::CudaEmulated),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceRequest::Cuda)
                    .map_err(|_| format!("bad device '{s}': expected auto, cpu, cuda or cuda:N with N a GPU index")),
                None => Err(format!("unknown device '{s}': expected auto, cpu, cuda, cuda:N or cuda-emu")),
            },
        }
    }
}

/// Raw device memory. The CPU variant is a plain vector; the CUDA backend adds its own variant.
pub enum Storage {
    Cpu(Vec<f32>),
    Cuda(cuda::device::DeviceBuffer),
}

impl Drop for Storage {
    fn drop(&mut self) {
        match self {
            Storage::Cpu(v) => cpu::buffers::recycle(std::mem::take(v)),
            // Returns itself to its pool when dropped.
            Storage::Cuda(_) => {}
        }
    }
}

impl Storage {
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(v) => v.len(),
            Storage::Cuda(b) => b.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The elementwise function a conv or dense forward applies after its bias, fused into the
/// kernel's store: a layer followed by a ReLU writes its output once, and training never keeps
/// the pre-activation (the ReLU's backward needs only the output's sign).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    Identity,
    Relu,
}

impl Activation {
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Activation::Identity => v,
            Activation::Relu => relu(v),
        }
    }
    /// The `act` argument of the CUDA kernels (`RV_ACT_*` in kernels/rotvar_common.cuh).
    pub fn code(self) -> i32 {
        match self {
            Activation::Identity => 0,
            Activation::Relu => 1,
        }
    }
}

/// torch.relu on one value: NaN propagates (`f32::max` would turn it into 0 and hide a diverged
/// run from the NaN check), and −0 becomes +0. The kernels' twin is `rv_relu`.
pub fn relu(v: f32) -> f32 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// L2 penalty added to the gradient, as torch.optim.Adam does (not decoupled AdamW).
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u32,
}

impl AdamParams {
    /// The step's scalars as the update uses them: step size lr / (1 − β₁ᵗ), 1 − β₁, β₂, 1 − β₂,
    /// ε, √(1 − β₂ᵗ); computed in f64, as torch computes them in Python floats, then rounded
    /// once (in f32, 1 − 0.999ᵗ loses digits).
    pub fn scalars(&self) -> [f32; 6] {
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.step as i32);
        let bc2_sqrt = (1.0 - (self.beta2 as f64).powi(self.step as i32)).sqrt();
        [
            (self.lr as f64 / bc1) as f32,
            (1.0 - self.beta1 as f64) as f32,
            self.beta2,
            (1.0 - self.beta2 as f64) as f32,
            self.eps,
            bc2_sqrt as f32,
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdParams {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

/// Byte counts of a backend's device buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryStats {
    /// In buffers handed out now.
    pub in_use_bytes: u64,
    /// The most in use at once since the last `reset_peak_memory`.
    pub peak_in_use_bytes: u64,
    /// Allocated from the driver: in use plus idle buffers kept for reuse.
    pub held_bytes: u64,
}

/// One method per op. Buffers are checked by the caller (`ops/`) to have the lengths the
/// geometry implies; a backend may assume it, but must return an error rather than panic when a
/// storage belongs to another device.
pub trait Backend: Send + Sync {
    fn device(&self) -> Device;
    /// A human-readable description ("cpu (2 threads; AMD EPYC (up to avx512), GEMM: ...)", "cuda:0 NVIDIA H100 ...").
    fn describe(&self) -> String;
    /// The arithmetic of convolutions and dense layers (`precision.rs`); fixed per backend.
    fn precision(&self) -> Precision {
        Precision::Fp32
    }

    // --- memory -------------------------------------------------------------------------
    fn zeros(&self, len: usize) -> Result<Storage>;
    /// A buffer whose contents are unspecified (possibly stale values from an earlier use):
    /// for op outputs, which every op writes in full, so zeroing them would be wasted work.
    fn alloc(&self, len: usize) -> Result<Storage>;
    fn upload(&self, host: &[f32]) -> Result<Storage>;
    fn download(&self, s: &Storage) -> Result<Vec<f32>>;
    /// Copy rows `idx[i]` of `src` (rows of `row_len`) into row i of `dst`: batch gathering
    /// from a dataset that stays resident on the device.
    fn gather_rows(&self, src: &Storage, row_len: usize, idx: &[u32], dst: &mut Storage) -> Result<()>;
    /// y[..len] = x[..len] (on a GPU the driver's device-to-device copy).
    fn copy(&self, x: &Storage, y: &mut Storage, len: usize) -> Result<()>;
    /// Wait for queued work (a no-op on the CPU); used only at measurement boundaries.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Milliseconds the device takes for the work `f` queues, for benchmarks. On a GPU: CUDA
    /// events recorded on the stream before and after (what the device did, launch gaps
    /// included; not the host's time to queue it). On the CPU, whose ops finish before they
    /// return: the wall clock.
    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.synchronize()?;
        let t = std::time::Instant::now();
        f()?;
        self.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }
    /// Device memory held in the backend's f32 buffers (activations, batches, parameters,
    /// gradients, datasets), or `None` where it is not tracked (the CPU).
    fn memory_stats(&self) -> Option<MemoryStats> {
        None
    }
    /// Start a new peak: `peak_in_use_bytes` becomes the bytes in use now.
    fn reset_peak_memory(&self) {}
    /// Kernels launched so far, or `None` where there are no kernels (the CPU): `bench train`
    /// reports launches per step, the cost a small model's GPU step is made of.
    fn kernel_launches(&self) -> Option<u64> {
        None
    }

    // --- benchmark probe (not a model op) -----------------------------------------------
    /// out[i] = the sum over c < 8 of the chain x ← fma(x, a, b), `iters` steps from
    /// x = ((i + c) mod 97)·0.01: 16·iters·len FLOPs of pure FMA work, whose throughput is the
    /// ceiling `rotvar bench conv` reports each pass against (kernels/peak.cu).
    fn peak_fma(&self, out: &mut Storage, a: f32, b: f32, iters: usize) -> Result<()>;

    // --- elementwise --------------------------------------------------------------------
    fn fill(&self, x: &mut Storage, value: f32) -> Result<()>;
    /// out = act(a + b)
    fn add(&self, a: &Storage, b: &Storage, act: Activation, out: &mut Storage) -> Result<()>;
    fn mul(&self, a: &Storage, b: &Storage, out: &mut Storage) -> Result<()>;
    fn scale(&self, x: &Storage, alpha: f32, out: &mut Storage) -> Result<()>;
    /// acc += x
    fn accumulate(&self, acc: &mut Storage, x: &Storage) -> Result<()>;
    fn relu_fwd(&self, x: &Storage, y: &mut Storage) -> Result<()>;
    /// dx = dy where y > 0 (y is the ReLU output).
    fn relu_bwd(&self, y: &Storage, dy: &Storage, dx: &mut Storage) -> Result<()>;
    /// [`Backend::relu_bwd`] of a convolution's fused ReLU (`y` its output), and in the same pass
    /// the bias gradient `conv2d_bwd_weight` would take from dx (same bits): `(dx, db)`, one read
    /// of the gradient instead of two. None, having allocated nothing, where the backend does
    /// not fuse them; the caller then runs the two separately.
    fn relu_bwd_bias(&self, _y: &Storage, _dy: &Storage, _g: &ConvGeom) -> Result<Option<(Storage, Storage)>> {
        Ok(None)
    }
    /// [`Backend::pool2d_bwd`] into a convolution's fused ReLU (`y`, its output, is the pool's
    /// input), then [`Backend::relu_bwd_bias`], in one pass: `(dz, db)`, the same bits. None,
    /// having allocated nothing, where the backend does not fuse them.
    fn pool_relu_bwd_bias(
        &self,
        _kind: PoolKind,
        _y: &Storage,
        _dp: &Storage,
        _g: &PoolGeom,
    ) -> Result<Option<(Storage, Storage)>> {
        Ok(None)
    }
    fn elu_fwd(&self, x: &Storage, alpha: f32, y: &mut Storage) -> Result<()>;
    fn elu_bwd(&self, x: &Storage, y: &Storage, dy: &Storage, alpha: f32, dx: &mut Storage) -> Result<()>;
    /// Inverted dropout: mask[i] = 0 with probability p else 1/(1-p), drawn from a counter-based
    /// hash of (seed, i) so the mask does not depend on threads or device; y = x * mask.
    fn dropout_fwd(&self, x: &Storage, p: f32, seed: u64, y: &mut Storage, mask: &mut Storage) -> Result<()>;

    // --- dense layers -------------------------------------------------------------------
    /// y[n, m] = act(x[n, k] · w[m, k]ᵀ + b[m])
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// dx[n, k] = dy[n, m] · w[m, k]
    fn linear_bwd_data(&self, dy: &Storage, w: &Storage, dx: &mut Storage, n: usize, k: usize, m: usize) -> Result<()>;
    /// dw[m, k] = dy[n, m]ᵀ · x[n, k]; db[m] = Σ_n dy[n, m]
    fn linear_bwd_weight(
        &self,
        x: &Storage,
        dy: &Storage,
        dw: &mut Storage,
        db: Option<&mut Storage>,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()>;
    /// y = act(conv(x, w) + b)
    fn conv2d_fwd(
        &self,
        x: &Storage,
        w: &Storage,
        b: Option<&Storage>,
        act: Activation,
        y: &mut Storage,
        g: &ConvGeom,
    ) -> Result<()>;
    fn conv2d_bwd_data(&self, dy: &Storage, w: &Storage, dx: &mut Storage, g: &ConvGeom) -> Result<()>;
    fn conv2d_bwd_weight(
        &self,
        x: &Storage,
        dy: &Storage,
        dw: &mut Storage,
        db: Option<&mut Storage>,
        g: &ConvGeom,
    ) -> Result<()>;
    /// Both of the above for one layer, equal to them bit for bit; a backend may share work
    /// between the two (the CPU's Winograd transforms dy once for both).
    #[allow(clippy::too_many_arguments)]
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
        self.conv2d_bwd_data(dy, w, dx, g)?;
        self.conv2d_bwd_weight(x, dy, dw, db, g)
    }

    // --- pooling ------------------------------------------------------------------------
    fn pool2d_fwd(&self, kind: PoolKind, x: &Storage, y: &mut Storage, g: &PoolGeom) -> Result<()>;
    /// Max pooling routes each gradient to the first maximum of its window (recomputed from x,
    /// so no index buffer is kept between forward and backward).
    fn pool2d_bwd(&self, kind: PoolKind, x: &Storage, dy: &Storage, dx: &mut Storage, g: &PoolGeom) -> Result<()>;

    // --- normalization ------------------------------------------------------------------
    /// Training-mode batch norm: batch statistics (two-pass, numerically sound), saves mean and
    /// 1/sqrt(var+eps) for backward, and updates running stats with the unbiased variance as
    /// PyTorch does: r = (1-momentum)·r + momentum·batch.
    #[allow(clippy::too_many_arguments)]
    /// y = act(batch-normalized x): the activation fused into the normalizing pass.
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
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// [`Backend::batchnorm_bwd`] of a batch norm with a fused ReLU (`y` its output), the ReLU's
    /// backward applied to `dy` on the way: the same bits as [`Backend::relu_bwd`] first. Backends
    /// that do not fuse them run the two.
    #[allow(clippy::too_many_arguments)]
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
        let mut dz = self.alloc(g.len())?;
        self.relu_bwd(y, dy, &mut dz)?;
        self.batchnorm_bwd(x, gamma, save_mean, save_invstd, &dz, dx, dgamma, dbeta, g)
    }

    // --- loss and reductions ------------------------------------------------------------
    fn log_softmax_fwd(&self, x: &Storage, y: &mut Storage, rows: usize, cols: usize) -> Result<()>;
    /// dx = dy - exp(y) · Σ_j dy (y is the log-softmax output).
    fn log_softmax_bwd(&self, y: &Storage, dy: &Storage, dx: &mut Storage, rows: usize, cols: usize) -> Result<()>;
    /// loss[0] = -mean_i logp[i, label_i]; labels are class indices stored as f32.
    fn nll_fwd(&self, logp: &Storage, labels: &Storage, loss: &mut Storage, rows: usize, cols: usize) -> Result<()>;
    /// dlogp[i, j] = -dloss / rows at j = label_i, else 0.
    fn nll_bwd(&self, labels: &Storage, dloss: &Storage, dlogp: &mut Storage, rows: usize, cols: usize) -> Result<()>;
    /// out[0] = Σ x (deterministic order).
    fn sum(&self, x: &Storage, out: &mut Storage) -> Result<()>;
    /// dx[i] = alpha · dy[0] for every i: the backward of a (scaled) sum.
    fn broadcast_scalar(&self, dy: &Storage, alpha: f32, dx: &mut Storage) -> Result<()>;
    /// For each row, the index of the largest value (first on ties), as f32.
    fn argmax_rows(&self, x: &Storage, out: &mut Storage, rows: usize, cols: usize) -> Result<()>;

    // --- data transforms ----------------------------------------------------------------
    /// Resample every image of `x` (NCHW, geometry `g`) through its own affine sampling matrix,
    /// output the same size: rotation, zoom, flips and translation (and any composition of them)
    /// in one pass.
    ///
    /// Inverse mapping about the image centre (cx, cy) = ((w−1)/2, (h−1)/2): output pixel
    /// (ox, oy) of image i reads the source point sx = (m0·fx + m1·fy) + cx,
    /// sy = (m2·fx + m3·fy) + cy with fx = (ox − cx) − tx, fy = (oy − cy) − ty and
    /// [m0, m1, m2, m3, tx, ty] = `mats[i]` (f32; products and sums each rounded in f32 in this order, no fused multiply-add,
    /// so every backend gets the same bits). Rotation by θ counter-clockwise as displayed (row 0
    /// at the top; torchvision's `rotate` convention) is [`rotation_matrix`]`(θ)`; a zoom by z
    /// divides the matrix by z; flipping the source horizontally before the rest negates the
    /// first row (m0, m1), vertically the second (m2, m3); (tx, ty) moves the result right and
    /// down by that many pixels (integer shifts are exact, and a zero shift changes no bit). `Nearest` rounds (sx, sy)
    /// half to even; `Bilinear` blends the four neighbours with weights wx = sx − ⌊sx⌋,
    /// wy = sy − ⌊sy⌋ as (1−wy)·lerp(row y0) + wy·lerp(row y0+1), where lerp(a, b, t) =
    /// (1−t)·a + t·b, and a blend whose weight t is exactly 0 returns `a` unchanged (so integer
    /// source points copy the pixel bit-exactly: the identity and quarter turns are exact).
    /// Source pixels outside the image read `fill[channel]` (per tap for bilinear): with fill =
    /// the normalized value of raw black (−mean/std) this matches rotating raw images with black
    /// fill. torchvision differs only at the border of bilinear output, where it also multiplies
    /// the blended in-image value by the in-image weight. `mats.len() == g.n`,
    /// `fill.len() == g.c`. No backward: warps are applied to data.
    fn warp(
        &self,
        x: &Storage,
        mats: &[Affine],
        interp: Interp,
        fill: &[f32],
        y: &mut Storage,
        g: &RotateGeom,
    ) -> Result<()>;

    // --- variance measure (docs/measure.md) ----------------------------------------------
    /// A fresh running state for one layer of geometry `g` (checked), every accumulator zero,
    /// on this backend's device.
    fn variance_init(&self, g: &VarianceGeom) -> Result<VarianceState>;
    /// Feed one batch of samples at rotation `j` into `st`.
    ///
    /// `act` is the layer's activation [n, units, hw] (f32, contiguous; an NCHW map gives
    /// units = C, hw = H·W per feature map, or units = C·H·W, hw = 1 per element), 1 ≤ n ≤ batch.
    /// `class[b]` < classes is sample b's label; `rank[b]` is the 1-based running count of
    /// sample b within its class over the whole pass so far (the same for every j).
    ///
    /// Per unit u, for b = 0..n in order: v = the unit's value from its hw values
    /// ([`variance::reduce_unit`], f64); V_x: Welford step ([`variance::welford_step`]) of the
    /// (class[b], j, u) moments with count rank[b]; V_t: at j = 0 the (b, u) moments become
    /// (v, 0), otherwise a Welford step with count j + 1; at j = m − 1 the standard deviation
    /// [`variance::std_from_m2`]`(M2, m)` of those moments is added to sum_std[class[b], u].
    /// Each unit's samples are processed in order by one thread, so the result never depends
    /// on thread counts, and CPU and CUDA agree bit for bit.
    ///
    /// Caller contract: for each batch, call with j = 0, 1, …, m − 1 in order, with the same
    /// `class` and `rank`, before the next batch. Everything is checked first; a violation
    /// (j out of range or order, n > batch, wrong lengths, a label ≥ classes, a rank that is
    /// not the running count) is an error and leaves `st` unchanged.
    fn variance_update(
        &self,
        st: &mut VarianceState,
        act: &Storage,
        n: usize,
        class: &[u32],
        rank: &[u32],
        j: usize,
    ) -> Result<()>;
    /// The accumulators of `st` on the host (an error while a batch is incomplete).
    fn variance_read(&self, st: &VarianceState) -> Result<VarianceMoments>;
    /// Begin a batch whose m rotations are fed updates ([`Backend::variance_update_fed`]), as
    /// passes replayed as one graph need: a replay cannot pass a new j. `class` and `rank` are
    /// checked as `variance_update` checks them at j = 0 and kept (on the device) for the m
    /// updates; no plain update or read is allowed until [`Backend::variance_end_fed`].
    fn variance_begin_fed(&self, st: &mut VarianceState, class: &[u32], rank: &[u32]) -> Result<()> {
        st.begin_fed(class, rank)
    }
    /// `variance_update` of the fed batch's n samples, with j = counter[0] (u32 bits) read on
    /// the device. The caller runs j = 0, 1, …, m − 1 in order, then `variance_end_fed`. The
    /// default is the reference: the counter read back and a plain, fully checked update.
    fn variance_update_fed(&self, st: &mut VarianceState, act: &Storage, counter: &Storage) -> Result<()> {
        let j = self.download(counter)?[0].to_bits() as usize;
        let f = st.fed()?;
        let (class, rank) = (f.class.clone(), f.rank.clone());
        st.with_fed_aside(|st| self.variance_update(st, act, class.len(), &class, &rank, j))
    }
    /// End the fed batch begun by `variance_begin_fed`, after its m updates.
    fn variance_end_fed(&self, st: &mut VarianceState) -> Result<()> {
        st.end_fed(true)
    }

    // --- optimizers ---------------------------------------------------------------------
    fn adam_step(
        &self,
        p: &mut Storage,
        grad: &Storage,
        m: &mut Storage,
        v: &mut Storage,
        h: &AdamParams,
    ) -> Result<()>;
    /// Adam on several tensors with the same hyper-parameters but each its own weight decay
    /// (`h.weight_decay` is not used). By default one `adam_step` per tensor; the CUDA backend
    /// updates them all in one launch, with the same bits.
    fn adam_step_many(&self, tensors: &mut [AdamTensor<'_>], h: &AdamParams) -> Result<()> {
        for t in tensors.iter_mut() {
            self.adam_step(t.param, t.grad, t.m, t.v, &AdamParams { weight_decay: t.weight_decay, ..*h })?;
        }
        Ok(())
    }
    fn sgd_step(&self, p: &mut Storage, grad: &Storage, velocity: &mut Storage, h: &SgdParams) -> Result<()>;

    // --- the feed: a step's varying values read on the device -----------------------------
    // A training step replayed as a graph cannot take new kernel arguments, so what changes
    // from step to step (batch indices, augmentation matrices, the dropout seed, Adam's bias
    // corrections) sits in device tables with one row per step, and a one-word device counter
    // (a u32 bit pattern) says which row is this step's (`crate::feed`). The default bodies
    // below are the reference: plain host code over the downloaded values, which is what the
    // CPU runs; the CUDA backend overrides each with its kernel (kernels/data.cu, elementwise.cu).

    /// dst[..host.len()] = host, in place: the buffer keeps its address, so a captured graph
    /// that reads it sees the new values.
    fn upload_into(&self, dst: &mut Storage, host: &[f32]) -> Result<()> {
        let s = self.upload(host)?;
        self.copy(&s, dst, host.len())
    }
    /// cur[..n] = table[k·n..(k + 1)·n] with k = counter[0] (as u32 bits); k ≥ `rows` is an
    /// error (a trap on a GPU).
    fn feed_stage(&self, table: &Storage, rows: usize, counter: &Storage, cur: &mut Storage, n: usize) -> Result<()> {
        let k = feed_row(&self.download(counter)?, rows)?;
        let t = self.download(table)?;
        self.upload_into(cur, &t[k * n..(k + 1) * n])
    }
    /// log[k·n..(k + 1)·n] = src[..n] with k = counter[0]; k ≥ `rows` is an error.
    fn feed_store(&self, src: &Storage, counter: &Storage, log: &mut Storage, rows: usize, n: usize) -> Result<()> {
        let k = feed_row(&self.download(counter)?, rows)?;
        let mut l = self.download(log)?;
        l[k * n..(k + 1) * n].copy_from_slice(&self.download(src)?[..n]);
        self.upload_into(log, &l)
    }
    /// counter[0] += 1.
    fn feed_advance(&self, counter: &mut Storage) -> Result<()> {
        let k = self.download(counter)?[0].to_bits().wrapping_add(1);
        self.upload_into(counter, &[f32::from_bits(k)])
    }
    /// `gather_rows` with the `n` indices (u32 bits) in a device buffer. The caller checked them
    /// against the rows of `src` before they went to the device (a GPU kernel cannot report it).
    fn gather_rows_fed(&self, src: &Storage, row_len: usize, idx: &Storage, n: usize, dst: &mut Storage) -> Result<()> {
        let idx: Vec<u32> = self.download(idx)?[..n].iter().map(|v| v.to_bits()).collect();
        self.gather_rows(src, row_len, &idx, dst)
    }
    /// `warp` with the matrices (6 values per image) and fill in device buffers.
    fn warp_fed(
        &self,
        x: &Storage,
        mats: &Storage,
        interp: Interp,
        fill: &Storage,
        y: &mut Storage,
        g: &RotateGeom,
    ) -> Result<()> {
        let m: Vec<Affine> =
            self.download(mats)?[..6 * g.n].chunks(6).map(|c| c.try_into().expect("6 values")).collect();
        self.warp(x, &m, interp, &self.download(fill)?[..g.c], y, g)
    }
    /// `dropout_fwd` with the seed splitmix64(step_seed ^ layer), step_seed the u64 whose low
    /// and high words are seed[0] and seed[1]: the seed `nn` derives for dropout layer `layer`.
    fn dropout_fed(
        &self,
        x: &Storage,
        p: f32,
        seed: &Storage,
        layer: u64,
        y: &mut Storage,
        mask: &mut Storage,
    ) -> Result<()> {
        let w = self.download(seed)?;
        let step_seed = w[0].to_bits() as u64 | (w[1].to_bits() as u64) << 32;
        self.dropout_fwd(x, p, crate::rng::splitmix64(step_seed ^ layer), y, mask)
    }
    /// `adam_step_many` with the step's scalars ([`AdamParams::scalars`]) in a device buffer.
    fn adam_step_many_fed(&self, tensors: &mut [AdamTensor<'_>], scalars: &Storage) -> Result<()> {
        let s: [f32; 6] = self.download(scalars)?[..6].try_into().expect("6 scalars");
        for t in tensors.iter_mut() {
            cpu::adam_apply(host_mut(t.param)?, host(t.grad)?, host_mut(t.m)?, host_mut(t.v)?, &s, t.weight_decay);
        }
        Ok(())
    }

    // --- graphs -------------------------------------------------------------------------
    /// Record the device work that `f` queues as one graph, replayed by [`Backend::replay`].
    /// As with CUDA stream capture, the recorded work does not run now: replay it. `Ok(None)`:
    /// this backend has no graphs (the CPU) and `f` was not called. An error: the capture
    /// failed (`f` queued work a graph cannot hold, such as a host transfer), nothing of it ran,
    /// and the caller should run plain launches.
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<Graph>> {
        let _ = f;
        Ok(None)
    }
    /// Run a captured graph: one launch for the whole recorded step.
    fn replay(&self, g: &Graph) -> Result<()> {
        let _ = g;
        bail!("this backend has no graphs")
    }
    /// Graph replays so far, or `None` where there are no graphs (the CPU).
    fn graph_replays(&self) -> Option<u64> {
        None
    }
}

/// A captured graph (`Backend::capture`), opaque outside its backend.
pub struct Graph {
    pub(crate) inner: Box<dyn std::any::Any + Send + Sync>,
    /// Kernels one replay runs.
    pub kernels: usize,
}

/// The row a feed counter names, checked against the table's `rows`.
fn feed_row(counter: &[f32], rows: usize) -> Result<usize> {
    let k = counter[0].to_bits() as usize;
    if k >= rows {
        bail!("feed: step counter {k} is past the table's {rows} rows");
    }
    Ok(k)
}

fn host(s: &Storage) -> Result<&[f32]> {
    match s {
        Storage::Cpu(v) => Ok(v),
        _ => bail!("internal: the reference feed ops run on host buffers"),
    }
}

fn host_mut(s: &mut Storage) -> Result<&mut [f32]> {
    match s {
        Storage::Cpu(v) => Ok(v),
        _ => bail!("internal: the reference feed ops run on host buffers"),
    }
}

/// One parameter tensor of [`Backend::adam_step_many`]: its data, gradient and moments.
pub struct AdamTensor<'a> {
    pub param: &'a mut Storage,
    pub grad: &'a Storage,
    pub m: &'a mut Storage,
    pub v: &'a mut Storage,
    pub weight_decay: f32,
}

pub type BackendRef = Arc<dyn Backend>;

/// Turn a device request into a backend, and a line saying what was chosen and why.
pub fn select(req: DeviceRequest, precision: Precision) -> Result<(BackendRef, String)> {
    let cpu = || -> BackendRef { cpu::CpuBackend::with_precision(precision) };
    match req {
        DeviceRequest::Cpu => {
            let b = cpu();
            let line = format!("device: {}", b.describe());
            Ok((b, line))
        }
        DeviceRequest::Auto => match cuda::CudaBackend::open_with(0, precision) {
            Ok(g) => {
                let line = format!("device: {} (auto)", g.describe());
                Ok((g, line))
            }
            Err(e) => {
                let b = cpu();
                let line = format!("device: {} (auto: no GPU used: {e:#})", b.describe());
                Ok((b, line))
            }
        },
        DeviceRequest::Cuda(i) => {
            let g = cuda::CudaBackend::open_with(i, precision).map_err(|e| {
                anyhow::anyhow!("cannot use cuda:{i}: {e:#}. Use --device cpu (or auto) to run on the CPU.")
            })?;
            let line = format!("device: {}", g.describe());
            Ok((g, line))
        }
        DeviceRequest::CudaEmulated => {
            let g = cuda::CudaBackend::emulated_with(precision);
            let line = format!("device: {}", g.describe());
            Ok((g, line))
        }
    }
}

/// The GPUs this machine offers, or why there are none (for `rotvar info`).
pub fn cuda_devices() -> std::result::Result<Vec<String>, String> {
    let mut found = Vec::new();
    for i in 0.. {
        match cuda::CudaBackend::open(i) {
            Ok(g) => found.push(g.describe()),
            Err(e) if i == 0 => return Err(format!("{e:#}")),
            Err(_) => break,
        }
    }
    Ok(found)
}
