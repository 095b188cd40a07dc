//! The CUDA backend: every op of the `Backend` trait as hand-written kernels (kernels/*.cu).
//!
//! The same code drives a real GPU (`CudaBackend::open`) or the host emulator
//! (`CudaBackend::emulated`), which is how every launch below is tested in CI without a GPU.
//! Launch configurations live next to each call and follow the comment at each kernel's
//! definition.

mod batch;
pub mod device;
pub mod emu;
mod gemm;
mod graph;
pub mod kernels;
mod launch;
pub mod launch_log;
mod optim;
mod variance;

use super::{
    Activation, AdamParams, AdamTensor, Affine, Backend, ConvGeom, Device, Graph, Interp, NormGeom, PoolGeom, PoolKind,
    Precision, RotateGeom, SgdParams, Storage, VarianceGeom, VarianceMoments, VarianceState,
};
use anyhow::{bail, Result};
use device::{DeviceBuffer, Exec, Gpu, Pool};
use emu::KArg;
pub use gemm::ConvTiles;
use gemm::{conv_plan, tc_kernel, Gemm};
use launch::{ew_blocks, sum_rows_blocks};
use std::sync::{Arc, Mutex};
pub use variance::CudaVariance;

pub struct CudaBackend {
    exec: Exec,
    ordinal: usize,
    pool: Arc<Pool>,
    /// The device copy of the last batch's indices (see `gather_rows`).
    indices: Mutex<Option<device::IdxBuf>>,
    /// ROTVAR_CONV_TILES (auto, v1, v4, v5): which conv kernels may be chosen, so `bench conv`
    /// can time v1, the default choice, v4 and v5 side by side.
    conv_tiles: ConvTiles,
    /// ROTVAR_VARIANCE_V1=1: the measure's update uses variance_update_f64 (one thread per
    /// unit) rather than v2 (one per unit and class), so `bench measure` can time the two.
    variance_v1: bool,
    launches: std::sync::atomic::AtomicU64,
    /// fp32 runs the CUDA-core kernels; the others their tensor-core twins (`launch_mm`).
    precision: Precision,
    /// The multi-tensor Adam step's table (see `adam_step_many`).
    adam_table: Mutex<optim::AdamTable>,
    /// The graph capture in progress, if any (graph.rs).
    capture: Mutex<Option<graph::Capture>>,
    replays: std::sync::atomic::AtomicU64,
}

type Dim = (u32, u32, u32);
const BLOCK: Dim = (256, 1, 1);
/// The 64×64-tile kernels (GEMM, implicit-GEMM convolutions) run 256 threads per block.
const TILE: usize = 64;

fn i32_of(v: usize, what: &str) -> Result<KArg> {
    i32::try_from(v).map(KArg::I32).map_err(|_| anyhow::anyhow!("{what} = {v} is too large for a 32-bit kernel index"))
}

/// ROTVAR_CONV_TILES, or v1 where ROTVAR_CONV_V1=1 (older scripts); a bad value is an error
/// when the backend opens.
fn conv_tiles() -> Result<ConvTiles> {
    if std::env::var("ROTVAR_CONV_V1").is_ok_and(|v| v == "1") {
        return Ok(ConvTiles::V1);
    }
    ConvTiles::parse(&std::env::var("ROTVAR_CONV_TILES").unwrap_or_default())
}

fn variance_v1() -> bool {
    std::env::var("ROTVAR_VARIANCE_V1").is_ok_and(|v| v == "1")
}

fn grid2(x: usize, y: usize) -> Dim {
    (x.max(1) as u32, y.max(1) as u32, 1)
}

impl CudaBackend {
    /// The GPU `ordinal`, or an error that says what is missing.
    pub fn open(ordinal: usize) -> Result<Arc<CudaBackend>> {
        Self::open_with(ordinal, Precision::Fp32)
    }

    /// The GPU `ordinal`, its convolutions and dense layers in `precision`.
    pub fn open_with(ordinal: usize, precision: Precision) -> Result<Arc<CudaBackend>> {
        let tiles = conv_tiles()?;
        Ok(Arc::new(Self::with_exec(Exec::Gpu(Gpu::open(ordinal)?), ordinal, precision, tiles)))
    }

    /// The same backend with its kernels run by the host emulator (slow; for tests).
    pub fn emulated() -> Arc<CudaBackend> {
        Self::emulated_with(Precision::Fp32)
    }

    /// A bad ROTVAR_CONV_TILES falls back to the default here (tests); `rotvar` opens through
    /// `select`, which reports it.
    pub fn emulated_with(precision: Precision) -> Arc<CudaBackend> {
        Arc::new(Self::with_exec(Exec::Emulated, 0, precision, conv_tiles().unwrap_or(ConvTiles::Auto)))
    }

    /// The emulated backend choosing its conv kernels among `tiles` (tests of the v4 kernels).
    pub fn emulated_with_tiles(precision: Precision, tiles: ConvTiles) -> Arc<CudaBackend> {
        Arc::new(Self::with_exec(Exec::Emulated, 0, precision, tiles))
    }

    fn with_exec(exec: Exec, ordinal: usize, precision: Precision, conv_tiles: ConvTiles) -> CudaBackend {
        CudaBackend {
            exec,
            ordinal,
            pool: Arc::default(),
            indices: Mutex::default(),
            conv_tiles,
            variance_v1: variance_v1(),
            launches: Default::default(),
            precision,
            adam_table: Mutex::default(),
            capture: Mutex::default(),
            replays: Default::default(),
        }
    }

    /// How often the multi-tensor Adam table was sent to the device (once per parameter set).
    pub fn adam_table_uploads(&self) -> u64 {
        self.adam_table.lock().unwrap_or_else(|e| e.into_inner()).uploads
    }

    pub fn is_emulated(&self) -> bool {
        matches!(self.exec, Exec::Emulated)
    }

    fn buf<'a>(&self, s: &'a Storage) -> Result<&'a DeviceBuffer> {
        match s {
            Storage::Cuda(b) => Ok(b),
            _ => bail!("a tensor on the CPU was passed to the CUDA backend; move it to the GPU first"),
        }
    }

    /// Kernel argument for a buffer, checking it holds at least `len` values.
    fn arg(&self, s: &Storage, len: usize) -> Result<KArg> {
        let b = self.buf(s)?;
        if b.len() < len {
            bail!("CUDA backend: buffer of {} values where {len} are needed", b.len());
        }
        Ok(self.exec.ptr(b.buf()))
    }

    fn opt_arg(&self, s: Option<&Storage>, len: usize) -> Result<KArg> {
        match s {
            Some(s) => self.arg(s, len),
            None => Ok(KArg::Ptr(0)),
        }
    }

    fn new_buf(&self, len: usize) -> Result<Storage> {
        Ok(Storage::Cuda(self.exec.alloc(&self.pool, len)?))
    }

    /// Grid for a grid-stride kernel that handles one of `n` values per thread and step (see
    /// [`ew_blocks`]).
    fn ew_grid(&self, n: usize) -> Dim {
        (ew_blocks(n, 1, self.exec.sm_count()), 1, 1)
    }

    /// One thread per item (with `BLOCK`), for kernels whose items are long sequential loops
    /// (the variance measure folds a whole batch per unit): more threads in flight, up to 16
    /// blocks per SM before the grid-stride loop takes over.
    fn thread_per_item_grid(&self, n: usize) -> Dim {
        let cap = 16 * self.exec.sm_count() as usize;
        (n.div_ceil(BLOCK.0 as usize).clamp(1, cap) as u32, 1, 1)
    }

    fn launch(&self, name: &str, grid: Dim, block: Dim, shared: u32, args: &[KArg]) -> Result<()> {
        if let Some(recorded) = self.captured_launch(name, grid, block, shared, args) {
            return recorded;
        }
        self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.exec.launch(name, grid, block, shared, args)
    }

    /// The conv tiles to choose from: ROTVAR_CONV_TILES, except that the tensor-core kernels
    /// have no v4 tile.
    fn tiles(&self) -> ConvTiles {
        match (self.conv_tiles, self.precision) {
            (ConvTiles::V4, p) if p != Precision::Fp32 => ConvTiles::Auto,
            (t, _) => t,
        }
    }

    /// A GEMM-shaped kernel of gemm.cu or conv.cu named by its fp32 variant: in fp32 that
    /// kernel, otherwise its tensor-core twin (`tc_kernel`) with the precision as one more
    /// argument.
    fn launch_mm(&self, name: &str, grid: Dim, block: Dim, args: &[KArg]) -> Result<()> {
        if self.precision == Precision::Fp32 {
            return self.launch(name, grid, block, 0, args);
        }
        let tc = tc_kernel(name).ok_or_else(|| anyhow::anyhow!("{name} has no tensor-core variant"))?;
        let mut args = args.to_vec();
        args.push(KArg::I32(self.precision.code()));
        self.launch(&tc, grid, block, 0, &args)
    }

    /// A kernel of kernels/elementwise.cu over `n` values; `args` end with the length. Each thread
    /// moves a float4 per step where the buffers are aligned.
    fn ew(&self, name: &str, n: usize, args: Vec<KArg>) -> Result<()> {
        self.ew_launch(name, n, 4, args)
    }

    /// A scalar grid-stride kernel (kernels/data.cu) over `n` values; `args` end with the length.
    fn flat(&self, name: &str, n: usize, args: Vec<KArg>) -> Result<()> {
        self.ew_launch(name, n, 1, args)
    }

    fn ew_launch(&self, name: &str, n: usize, per_thread: usize, mut args: Vec<KArg>) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        args.push(KArg::I64(n as i64));
        self.launch(name, (ew_blocks(n, per_thread, self.exec.sm_count()), 1, 1), BLOCK, 0, &args)
    }

    fn pool_args(&self, kind: PoolKind, g: &PoolGeom) -> Result<Vec<KArg>> {
        let mut v = vec![KArg::I32(match kind {
            PoolKind::Max => 0,
            PoolKind::Avg => 1,
        })];
        for (n, x) in [
            ("N", g.n),
            ("C", g.c),
            ("H", g.h),
            ("W", g.w),
            ("k", g.k),
            ("stride", g.stride),
            ("pad", g.pad),
            ("OH", g.oh),
            ("OW", g.ow),
        ] {
            v.push(i32_of(x, n)?);
        }
        Ok(v)
    }

    fn norm_dims(&self, g: &NormGeom) -> Result<[KArg; 3]> {
        Ok([i32_of(g.n, "N")?, i32_of(g.c, "C")?, i32_of(g.hw, "HW")?])
    }

    /// One block reduces one channel: as wide as the hardware allows on a GPU; narrow under
    /// emulation, where every CUDA thread is a host thread.
    fn channel_block(&self) -> Dim {
        if self.is_emulated() {
            BLOCK
        } else {
            (1024, 1, 1)
        }
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn describe(&self) -> String {
        match self.precision {
            Precision::Fp32 => self.exec.describe(),
            p => format!("{}, precision {p}", self.exec.describe()),
        }
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn zeros(&self, len: usize) -> Result<Storage> {
        let mut s = self.new_buf(len)?;
        self.fill(&mut s, 0.0)?;
        Ok(s)
    }

    fn alloc(&self, len: usize) -> Result<Storage> {
        self.new_buf(len)
    }

    fn upload(&self, host: &[f32]) -> Result<Storage> {
        self.not_capturing("an upload")?;
        Ok(Storage::Cuda(self.exec.upload(&self.pool, host)?))
    }

    fn download(&self, s: &Storage) -> Result<Vec<f32>> {
        self.not_capturing("a download")?;
        self.exec.download(self.buf(s)?)
    }

    fn copy(&self, x: &Storage, y: &mut Storage, len: usize) -> Result<()> {
        self.not_capturing("a copy")?;
        let src = self.buf(x)?;
        let Storage::Cuda(dst) = y else {
            bail!("a tensor on the CPU was passed to the CUDA backend; move it to the GPU first");
        };
        self.exec.copy(src, dst, len)
    }

    fn gather_rows(&self, src: &Storage, row_len: usize, idx: &[u32], dst: &mut Storage) -> Result<()> {
        self.not_capturing("gather_rows with host indices")?;
        let rows = self.buf(src)?.len() / row_len.max(1);
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= rows) {
            bail!("gather_rows: row index {bad} out of range ({rows} rows)");
        }
        let mut slot = self.indices.lock().unwrap_or_else(|e| e.into_inner());
        self.exec.upload_indices(&mut slot, idx)?;
        let d = slot.as_ref().ok_or_else(|| anyhow::anyhow!("index buffer missing after upload"))?;
        let p = self.exec.idx_ptr(d);
        drop(slot);
        self.gather_launch(src, row_len, p, idx.len(), dst)
    }

    fn synchronize(&self) -> Result<()> {
        self.not_capturing("a synchronize")?;
        self.exec.synchronize()
    }

    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.not_capturing("timing")?;
        self.exec.time_ms(f)
    }

    fn memory_stats(&self) -> Option<super::MemoryStats> {
        Some(self.pool.stats())
    }

    fn kernel_launches(&self) -> Option<u64> {
        Some(self.launches.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn reset_peak_memory(&self) {
        self.pool.reset_peak()
    }

    fn peak_fma(&self, out: &mut Storage, a: f32, b: f32, iters: usize) -> Result<()> {
        let n = self.buf(out)?.len();
        if n == 0 {
            return Ok(());
        }
        let grid = (u32::try_from(n.div_ceil(BLOCK.0 as usize))?, 1, 1);
        let args = [self.arg(out, n)?, KArg::F32(a), KArg::F32(b), i32_of(iters, "iters")?, KArg::I64(n as i64)];
        self.launch("peak_fma_f32", grid, BLOCK, 0, &args)
    }

    fn fill(&self, x: &mut Storage, value: f32) -> Result<()> {
        let n = self.buf(x)?.len();
        self.ew("fill_f32", n, vec![self.arg(x, n)?, KArg::F32(value)])
    }

    fn add(&self, a: &Storage, b: &Storage, act: Activation, out: &mut Storage) -> Result<()> {
        let n = self.buf(out)?.len();
        self.ew("add_f32", n, vec![self.arg(out, n)?, self.arg(a, n)?, self.arg(b, n)?, KArg::I32(act.code())])
    }

    fn mul(&self, a: &Storage, b: &Storage, out: &mut Storage) -> Result<()> {
        let n = self.buf(out)?.len();
        self.ew("mul_f32", n, vec![self.arg(out, n)?, self.arg(a, n)?, self.arg(b, n)?])
    }

    fn scale(&self, x: &Storage, alpha: f32, out: &mut Storage) -> Result<()> {
        let n = self.buf(out)?.len();
        self.ew("scale_f32", n, vec![self.arg(out, n)?, self.arg(x, n)?, KArg::F32(alpha)])
    }

    fn accumulate(&self, acc: &mut Storage, x: &Storage) -> Result<()> {
        let n = self.buf(acc)?.len();
        self.ew("axpy_f32", n, vec![self.arg(acc, n)?, self.arg(x, n)?, KArg::F32(1.0)])
    }

    fn relu_fwd(&self, x: &Storage, y: &mut Storage) -> Result<()> {
        let n = self.buf(y)?.len();
        self.ew("relu_fwd_f32", n, vec![self.arg(y, n)?, self.arg(x, n)?])
    }

    fn relu_bwd(&self, y: &Storage, dy: &Storage, dx: &mut Storage) -> Result<()> {
        // The kernel tests its third argument for > 0; ReLU's output is positive exactly where
        // its input is.
        let n = self.buf(dx)?.len();
        self.ew("relu_bwd_f32", n, vec![self.arg(dx, n)?, self.arg(dy, n)?, self.arg(y, n)?])
    }

    fn elu_fwd(&self, x: &Storage, alpha: f32, y: &mut Storage) -> Result<()> {
        let n = self.buf(y)?.len();
        self.ew("elu_fwd_f32", n, vec![self.arg(y, n)?, self.arg(x, n)?, KArg::F32(alpha)])
    }

    fn elu_bwd(&self, x: &Storage, _y: &Storage, dy: &Storage, alpha: f32, dx: &mut Storage) -> Result<()> {
        let n = self.buf(dx)?.len();
        self.ew("elu_bwd_f32", n, vec![self.arg(dx, n)?, self.arg(dy, n)?, self.arg(x, n)?, KArg::F32(alpha)])
    }

    fn dropout_fwd(&self, x: &Storage, p: f32, seed: u64, y: &mut Storage, mask: &mut Storage) -> Result<()> {
        let n = self.buf(y)?.len();
        self.flat(
            "dropout_fwd_f32",
            n,
            vec![self.arg(y, n)?, self.arg(mask, n)?, self.arg(x, n)?, KArg::F32(p), KArg::U64(seed)],
        )
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
        // y[n, m] = act(x[n, k] · w[m, k]ᵀ + b[m]), bias and activation in the GEMM's store
        let (xa, wa, ya, ba) = (self.arg(x, n * k)?, self.arg(w, m * k)?, self.arg(y, n * m)?, self.opt_arg(b, m)?);
        self.gemm(xa, wa, ya, ba, act, &Gemm { m: n, n: m, k, lda: k, ldb: k, ldc: m, ta: false, tb: true })
    }

    fn linear_bwd_data(&self, dy: &Storage, w: &Storage, dx: &mut Storage, n: usize, k: usize, m: usize) -> Result<()> {
        // dx[n, k] = dy[n, m] · w[m, k]
        let (dya, wa, dxa) = (self.arg(dy, n * m)?, self.arg(w, m * k)?, self.arg(dx, n * k)?);
        let g = Gemm { m: n, n: k, k: m, lda: m, ldb: k, ldc: k, ta: false, tb: false };
        self.gemm(dya, wa, dxa, KArg::Ptr(0), Activation::Identity, &g)
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
        // dw[m, k] = dy[n, m]ᵀ · x[n, k]
        let (dya, xa, dwa) = (self.arg(dy, n * m)?, self.arg(x, n * k)?, self.arg(dw, m * k)?);
        let g = Gemm { m, n: k, k: n, lda: m, ldb: k, ldc: k, ta: true, tb: false };
        self.gemm(dya, xa, dwa, KArg::Ptr(0), Activation::Identity, &g)?;
        if let Some(db) = db {
            // One block per 32-column tile (kernels/data.cu): every column gets a lane and every
            // warp of the block a share of the n rows.
            self.launch(
                "sum_rows_f32",
                grid2(sum_rows_blocks(m), 1),
                BLOCK,
                0,
                &[self.arg(db, m)?, self.arg(dy, n * m)?, i32_of(n, "rows")?, i32_of(m, "cols")?],
            )?;
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
        let mut args = vec![
            self.arg(y, g.out_len())?,
            self.arg(x, g.in_len())?,
            self.arg(w, g.weight_len())?,
            self.opt_arg(b, g.c_out)?,
        ];
        args.extend(self.conv_dims(g)?);
        args.push(KArg::I32(act.code()));
        let cols = g.n * g.oh * g.ow;
        let p = conv_plan("conv2d_fwd", g.c_out, cols, g.k(), self.exec.sm_count(), self.tiles(), false);
        self.launch_mm(&p.name, grid2(cols.div_ceil(p.bn), g.c_out.div_ceil(p.bm)), BLOCK, &args)
    }

    fn conv2d_bwd_data(&self, dy: &Storage, w: &Storage, dx: &mut Storage, g: &ConvGeom) -> Result<()> {
        let mut args = vec![self.arg(dx, g.in_len())?, self.arg(dy, g.out_len())?, self.arg(w, g.weight_len())?];
        args.extend(self.conv_dims(g)?);
        if g.stride > 1 && self.tiles() != ConvTiles::V1 {
            // One GEMM per sub-pixel phase over its valid taps only (kernels/conv.cu, v3).
            let phase_cols = g.n * g.h.div_ceil(g.stride) * g.w.div_ceil(g.stride);
            let grid = (phase_cols.div_ceil(TILE) as u32, g.c_in.div_ceil(TILE) as u32, (g.stride * g.stride) as u32);
            return self.launch_mm("conv2d_bwd_data_v3", grid, BLOCK, &args);
        }
        let (cols, red) = (g.n * g.h * g.w, g.c_out * g.kh * g.kw);
        let p = conv_plan("conv2d_bwd_data", g.c_in, cols, red, self.exec.sm_count(), self.tiles(), false);
        self.launch_mm(&p.name, grid2(cols.div_ceil(p.bn), g.c_in.div_ceil(p.bm)), BLOCK, &args)
    }

    fn conv2d_bwd_weight(
        &self,
        x: &Storage,
        dy: &Storage,
        dw: &mut Storage,
        db: Option<&mut Storage>,
        g: &ConvGeom,
    ) -> Result<()> {
        if g.kh > 0x7fff || g.kw > 0x7fff {
            bail!("conv2d backward weight: a {}x{} kernel is larger than the CUDA kernels allow (32767)", g.kh, g.kw);
        }
        let red = g.n * g.oh * g.ow;
        let p = conv_plan("conv2d_bwd_weight", g.c_out, g.k(), red, self.exec.sm_count(), self.tiles(), true);
        let (name, bm, bn, splits) = (p.name, p.bm, p.bn, p.splits);
        let len = g.weight_len();
        let partial = self.new_buf(splits * len)?;
        let mut args = vec![self.arg(&partial, splits * len)?, self.arg(x, g.in_len())?, self.arg(dy, g.out_len())?];
        args.extend(self.conv_dims(g)?);
        args.push(i32_of(splits, "splits")?);
        let grid = (g.k().div_ceil(bn) as u32, g.c_out.div_ceil(bm) as u32, splits as u32);
        self.launch_mm(&name, grid, BLOCK, &args)?;
        self.launch(
            "sum_partials_f32",
            self.ew_grid(len),
            BLOCK,
            0,
            &[self.arg(dw, len)?, self.arg(&partial, splits * len)?, i32_of(splits, "splits")?, KArg::I64(len as i64)],
        )?;
        if let Some(db) = db {
            let hw = g.oh * g.ow;
            self.launch(
                "channel_sum_f32",
                grid2(g.c_out, 1),
                BLOCK,
                0,
                &[
                    self.arg(db, g.c_out)?,
                    self.arg(dy, g.out_len())?,
                    i32_of(g.n, "N")?,
                    i32_of(g.c_out, "C")?,
                    i32_of(hw, "HW")?,
                ],
            )?;
        }
        Ok(())
    }

    fn pool2d_fwd(&self, kind: PoolKind, x: &Storage, y: &mut Storage, g: &PoolGeom) -> Result<()> {
        let mut args = vec![self.arg(y, g.out_len())?, self.arg(x, g.in_len())?];
        args.extend(self.pool_args(kind, g)?);
        self.launch("pool2d_fwd_f32", self.ew_grid(g.out_len()), BLOCK, 0, &args)
    }

    fn pool2d_bwd(&self, kind: PoolKind, x: &Storage, dy: &Storage, dx: &mut Storage, g: &PoolGeom) -> Result<()> {
        let mut args = vec![self.arg(dx, g.in_len())?, self.arg(x, g.in_len())?, self.arg(dy, g.out_len())?];
        args.extend(self.pool_args(kind, g)?);
        self.launch("pool2d_bwd_f32", self.ew_grid(g.in_len()), BLOCK, 0, &args)
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
        self.not_capturing("a warp with host matrices")?;
        g.check(mats, fill)?;
        if g.len() == 0 {
            return Ok(());
        }
        // The per-image matrices and per-channel fill: small temporaries from the pool, freed
        // after the launch is queued (the pool only hands them out again for work queued
        // behind it).
        let ms = self.upload(bytemuck::cast_slice(mats))?;
        let fv = self.upload(fill)?;
        self.warp_launch(x, self.arg(&ms, 6 * g.n)?, self.arg(&fv, g.c)?, interp, y, g)
    }

    fn variance_init(&self, g: &VarianceGeom) -> Result<VarianceState> {
        self.not_capturing("the variance measure")?;
        self.variance_state(g)
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
        self.not_capturing("the variance measure")?;
        self.variance_fold(st, act, n, class, rank, j)
    }

    fn variance_read(&self, st: &VarianceState) -> Result<VarianceMoments> {
        self.not_capturing("the variance measure")?;
        self.variance_moments(st)
    }

    fn variance_begin_fed(&self, st: &mut VarianceState, class: &[u32], rank: &[u32]) -> Result<()> {
        self.not_capturing("the variance measure's labels")?;
        self.variance_fed_begin(st, class, rank)
    }

    fn variance_update_fed(&self, st: &mut VarianceState, act: &Storage, counter: &Storage) -> Result<()> {
        self.variance_fed_update(st, act, counter)
    }

    fn variance_end_fed(&self, st: &mut VarianceState) -> Result<()> {
        st.end_fed(false)
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
        let [n, c, hw] = self.norm_dims(g)?;
        let stats = [
            self.arg(save_mean, g.c)?,
            self.arg(save_invstd, g.c)?,
            self.arg(running_mean, g.c)?,
            self.arg(running_var, g.c)?,
            self.arg(x, g.len())?,
            n,
            c,
            hw,
            KArg::F32(momentum),
            KArg::F32(eps),
        ];
        self.launch("bn_stats_f32", grid2(g.c, 1), self.channel_block(), 0, &stats)?;
        let apply = [
            self.arg(y, g.len())?,
            self.arg(x, g.len())?,
            self.arg(save_mean, g.c)?,
            self.arg(save_invstd, g.c)?,
            self.arg(gamma, g.c)?,
            self.arg(beta, g.c)?,
            n,
            c,
            hw,
            KArg::I32(act.code()),
        ];
        self.launch("bn_apply_f32", self.ew_grid(g.len()), BLOCK, 0, &apply)
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
        let [n, c, hw] = self.norm_dims(g)?;
        let args = [
            self.arg(y, g.len())?,
            self.arg(x, g.len())?,
            self.arg(running_mean, g.c)?,
            self.arg(running_var, g.c)?,
            self.arg(gamma, g.c)?,
            self.arg(beta, g.c)?,
            KArg::F32(eps),
            n,
            c,
            hw,
            KArg::I32(act.code()),
        ];
        self.launch("bn_eval_f32", self.ew_grid(g.len()), BLOCK, 0, &args)
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
        let [n, c, hw] = self.norm_dims(g)?;
        let reduce = [
            self.arg(dgamma, g.c)?,
            self.arg(dbeta, g.c)?,
            self.arg(x, g.len())?,
            self.arg(dy, g.len())?,
            self.arg(save_mean, g.c)?,
            self.arg(save_invstd, g.c)?,
            n,
            c,
            hw,
        ];
        self.launch("bn_bwd_reduce_f32", grid2(g.c, 1), self.channel_block(), 0, &reduce)?;
        let apply = [
            self.arg(dx, g.len())?,
            self.arg(x, g.len())?,
            self.arg(dy, g.len())?,
            self.arg(gamma, g.c)?,
            self.arg(save_mean, g.c)?,
            self.arg(save_invstd, g.c)?,
            self.arg(dgamma, g.c)?,
            self.arg(dbeta, g.c)?,
            n,
            c,
            hw,
        ];
        self.launch("bn_bwd_apply_f32", self.ew_grid(g.len()), BLOCK, 0, &apply)
    }

    fn log_softmax_fwd(&self, x: &Storage, y: &mut Storage, rows: usize, cols: usize) -> Result<()> {
        let args = [self.arg(y, rows * cols)?, self.arg(x, rows * cols)?, i32_of(rows, "rows")?, i32_of(cols, "cols")?];
        self.launch("log_softmax_fwd_f32", grid2(rows.div_ceil(8), 1), BLOCK, 0, &args)
    }

    fn log_softmax_bwd(&self, y: &Storage, dy: &Storage, dx: &mut Storage, rows: usize, cols: usize) -> Result<()> {
        let n = rows * cols;
        let args = [self.arg(dx, n)?, self.arg(dy, n)?, self.arg(y, n)?, i32_of(rows, "rows")?, i32_of(cols, "cols")?];
        self.launch("log_softmax_bwd_f32", grid2(rows.div_ceil(8), 1), BLOCK, 0, &args)
    }

    fn nll_fwd(&self, logp: &Storage, labels: &Storage, loss: &mut Storage, rows: usize, cols: usize) -> Result<()> {
        let args = [
            self.arg(loss, 1)?,
            self.arg(logp, rows * cols)?,
            self.arg(labels, rows)?,
            i32_of(rows, "rows")?,
            i32_of(cols, "cols")?,
        ];
        self.launch("nll_fwd_f32", (1, 1, 1), BLOCK, 0, &args)
    }

    fn nll_bwd(&self, labels: &Storage, dloss: &Storage, dlogp: &mut Storage, rows: usize, cols: usize) -> Result<()> {
        let args = [
            self.arg(dlogp, rows * cols)?,
            self.arg(labels, rows)?,
            self.arg(dloss, 1)?,
            i32_of(rows, "rows")?,
            i32_of(cols, "cols")?,
        ];
        self.launch("nll_bwd_f32", self.ew_grid(rows * cols), BLOCK, 0, &args)
    }

    fn sum(&self, x: &Storage, out: &mut Storage) -> Result<()> {
        // Two launches, no atomics: per-block partial sums, then one block folds them in order.
        let n = self.buf(x)?.len();
        let blocks = n.div_ceil(1024).clamp(1, 2 * self.exec.sm_count() as usize);
        let partial = self.new_buf(blocks)?;
        self.launch(
            "reduce_sum_f32",
            grid2(blocks, 1),
            BLOCK,
            0,
            &[self.arg(&partial, blocks)?, self.arg(x, n)?, KArg::I64(n as i64), KArg::F32(1.0)],
        )?;
        self.launch(
            "reduce_sum_f32",
            (1, 1, 1),
            (1024, 1, 1),
            0,
            &[self.arg(out, 1)?, self.arg(&partial, blocks)?, KArg::I64(blocks as i64), KArg::F32(1.0)],
        )
    }

    fn broadcast_scalar(&self, dy: &Storage, alpha: f32, dx: &mut Storage) -> Result<()> {
        let n = self.buf(dx)?.len();
        self.flat("broadcast_scalar_f32", n, vec![self.arg(dx, n)?, self.arg(dy, 1)?, KArg::F32(alpha)])
    }

    fn argmax_rows(&self, x: &Storage, out: &mut Storage, rows: usize, cols: usize) -> Result<()> {
        let args = [self.arg(out, rows)?, self.arg(x, rows * cols)?, i32_of(rows, "rows")?, i32_of(cols, "cols")?];
        // One warp per row (kernels/data.cu), as log_softmax.
        self.launch("argmax_rows_f32", grid2(rows.div_ceil(8), 1), BLOCK, 0, &args)
    }

    fn adam_step(
        &self,
        p: &mut Storage,
        grad: &Storage,
        m: &mut Storage,
        v: &mut Storage,
        h: &AdamParams,
    ) -> Result<()> {
        self.adam_one(p, grad, m, v, h)
    }

    fn adam_step_many(&self, tensors: &mut [AdamTensor<'_>], h: &AdamParams) -> Result<()> {
        self.adam_multi(tensors, optim::AdamScalars::Host(h))
    }

    fn sgd_step(&self, p: &mut Storage, grad: &Storage, velocity: &mut Storage, h: &SgdParams) -> Result<()> {
        self.sgd(p, grad, velocity, h)
    }

    fn feed_stage(&self, table: &Storage, rows: usize, counter: &Storage, cur: &mut Storage, n: usize) -> Result<()> {
        let args = vec![self.arg(cur, n)?, self.arg(table, rows * n)?, self.arg(counter, 1)?, KArg::I64(rows as i64)];
        self.flat("feed_stage_u32", n, args)
    }

    fn feed_store(&self, src: &Storage, counter: &Storage, log: &mut Storage, rows: usize, n: usize) -> Result<()> {
        let args = vec![self.arg(log, rows * n)?, self.arg(src, n)?, self.arg(counter, 1)?, KArg::I64(rows as i64)];
        self.flat("feed_store_u32", n, args)
    }

    fn feed_advance(&self, counter: &mut Storage) -> Result<()> {
        self.launch("feed_advance_u32", (1, 1, 1), (32, 1, 1), 0, &[self.arg(counter, 1)?])
    }

    fn gather_rows_fed(&self, src: &Storage, row_len: usize, idx: &Storage, n: usize, dst: &mut Storage) -> Result<()> {
        self.gather_launch(src, row_len, self.arg(idx, n)?, n, dst)
    }

    fn warp_fed(
        &self,
        x: &Storage,
        mats: &Storage,
        interp: Interp,
        fill: &Storage,
        y: &mut Storage,
        g: &RotateGeom,
    ) -> Result<()> {
        self.warp_launch(x, self.arg(mats, 6 * g.n)?, self.arg(fill, g.c)?, interp, y, g)
    }

    fn dropout_fed(
        &self,
        x: &Storage,
        p: f32,
        seed: &Storage,
        layer: u64,
        y: &mut Storage,
        mask: &mut Storage,
    ) -> Result<()> {
        let n = self.buf(y)?.len();
        let args = vec![
            self.arg(y, n)?,
            self.arg(mask, n)?,
            self.arg(x, n)?,
            KArg::F32(p),
            self.arg(seed, 2)?,
            KArg::U64(layer),
        ];
        self.flat("dropout_fed_f32", n, args)
    }

    fn adam_step_many_fed(&self, tensors: &mut [AdamTensor<'_>], scalars: &Storage) -> Result<()> {
        self.adam_multi(tensors, optim::AdamScalars::Device(scalars))
    }

    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<Graph>> {
        self.capture_graph(f).map(Some)
    }

    fn replay(&self, g: &Graph) -> Result<()> {
        self.replay_graph(g)
    }

    fn graph_replays(&self) -> Option<u64> {
        Some(self.replays.load(std::sync::atomic::Ordering::Relaxed))
    }
}
