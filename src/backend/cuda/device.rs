//! Device memory and kernel launches for the CUDA backend, on a real GPU (through cudarc's
//! driver API) or on the host (through the kernel emulator, `emu`).
//!
//! Both paths take the same launch description (kernel name, grid, block, shared memory, `KArg`
//! list), so every launch the backend makes on a GPU is also made, unchanged, by the emulated
//! parity tests that run in CI without a GPU.

use super::emu::{self, DeviceMem, KArg, PackedArgs};
use super::kernels;
use crate::backend::MemoryStats;
use anyhow::{anyhow, bail, Result};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where kernels run.
pub enum Exec {
    Gpu(Gpu),
    /// Host emulation: "device" memory is host memory, kernels run through `emu::launch`.
    Emulated,
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub sm_count: u32,
    /// Compute capability (major, minor): picks the embedded cubin or the PTX.
    pub cc: (i32, i32),
    /// Lazily loaded PTX modules and functions (a module is loaded on first use of any kernel).
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

/// A device buffer of f32.
pub enum Buf {
    Gpu(CudaSlice<f32>),
    Host(DeviceMem<f32>),
}

/// A device buffer of u32 (batch indices).
pub enum IdxBuf {
    Gpu(CudaSlice<u32>),
    Host(DeviceMem<u32>),
}

impl IdxBuf {
    pub fn len(&self) -> usize {
        match self {
            IdxBuf::Gpu(s) => s.len(),
            IdxBuf::Host(m) => m.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A device buffer of f64: the variance measure's accumulators. Few and long-lived, so they
/// bypass the f32 pool.
pub enum F64Buf {
    Gpu(CudaSlice<f64>),
    Host(DeviceMem<f64>),
}

/// A device buffer that returns to its pool when dropped: after the first training step every
/// buffer a step needs is found in the pool, so steady-state training allocates nothing.
pub struct DeviceBuffer {
    buf: Option<Buf>,
    len: usize,
    pool: Arc<Pool>,
    /// The pool capture that handed it out (0: none), so the capture can tell whether every
    /// buffer it handed out came back.
    capture: u64,
}

impl DeviceBuffer {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn buf(&self) -> &Buf {
        self.buf.as_ref().expect("buffer present until drop")
    }
    pub fn buf_mut(&mut self) -> &mut Buf {
        self.buf.as_mut().expect("buffer present until drop")
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.put(self.len, b, self.capture);
        }
    }
}

/// Idle buffers by length (a caching allocator in its simplest form), and the byte counts
/// behind `Backend::memory_stats`.
#[derive(Default)]
pub struct Pool {
    free: Mutex<HashMap<usize, Vec<Buf>>>,
    stats: Mutex<MemoryStats>,
    capture: Mutex<Option<PoolCapture>>,
}

/// The pool while a graph is captured (see graph.rs): buffers freed during the capture are
/// set aside for the graph, whose kernels address them on every replay, and reused only
/// within the same capture.
struct PoolCapture {
    id: u64,
    free: HashMap<usize, Vec<Buf>>,
    /// Buffers handed out during the capture and not yet returned.
    outstanding: i64,
}

/// What a finished capture leaves: the graph's buffers, and how many buffers handed out during
/// it are still alive (a replay would write them under their new owner).
pub struct CapturedMemory {
    pub buffers: Vec<(usize, Buf)>,
    pub outstanding: i64,
}

impl Pool {
    /// A buffer of `len` values, and the capture it is handed out under (0: none).
    fn take(&self, len: usize) -> (Option<Buf>, u64) {
        let mut cap = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        let from_main = || self.free.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&len).and_then(|v| v.pop());
        match cap.as_mut() {
            Some(c) => {
                let b = c.free.get_mut(&len).and_then(|v| v.pop()).or_else(from_main);
                c.outstanding += b.is_some() as i64;
                (b, c.id)
            }
            None => (from_main(), 0),
        }
    }
    fn put(&self, len: usize, b: Buf, handed_out_under: u64) {
        let mut cap = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        match cap.as_mut() {
            Some(c) => {
                c.outstanding -= (handed_out_under == c.id) as i64;
                c.free.entry(len).or_default().push(b);
            }
            None => self.free.lock().unwrap_or_else(|e| e.into_inner()).entry(len).or_default().push(b),
        }
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).in_use_bytes -= 4 * len as u64;
    }
    pub fn capturing(&self) -> bool {
        self.capture.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
    pub fn begin_capture(&self) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.capture.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(PoolCapture { id, free: HashMap::new(), outstanding: 0 });
    }
    pub fn end_capture(&self) -> CapturedMemory {
        let c = self.capture.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(c) = c else {
            return CapturedMemory { buffers: Vec::new(), outstanding: 0 };
        };
        let buffers = c.free.into_iter().flat_map(|(len, v)| v.into_iter().map(move |b| (len, b))).collect();
        CapturedMemory { buffers, outstanding: c.outstanding }
    }
    /// Idle buffers back from a dropped graph: reusable again.
    pub fn give_back(&self, buffers: Vec<(usize, Buf)>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        for (len, b) in buffers {
            free.entry(len).or_default().push(b);
        }
    }
    /// Count a buffer handed out: `fresh` when it was just allocated from the driver.
    fn handed_out(&self, len: usize, fresh: bool) {
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.in_use_bytes += 4 * len as u64;
        st.peak_in_use_bytes = st.peak_in_use_bytes.max(st.in_use_bytes);
        if fresh {
            st.held_bytes += 4 * len as u64;
        }
    }
    /// Release every idle buffer (on out-of-memory, before retrying).
    fn clear(&self) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let idle: u64 = free.iter().map(|(len, v)| 4 * (*len as u64) * v.len() as u64).sum();
        free.clear();
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).held_bytes -= idle;
    }
    pub fn stats(&self) -> MemoryStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn reset_peak(&self) {
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.peak_in_use_bytes = st.in_use_bytes;
    }
}

fn driver_err(what: &str, e: cudarc::driver::DriverError) -> anyhow::Error {
    anyhow!("CUDA: {what} failed: {e:?}")
}

impl Gpu {
    /// Open GPU `ordinal`, checking each thing that can be missing so that no call below can
    /// panic: a driver library, a device, this ordinal.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !kernels::HAVE_PTX {
            bail!(
                "this build of rotvar has no GPU kernels ({}): nvcc was not found when it was built and the \
                 committed kernels/generated/ did not match the sources. Install nvcc (pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
                 nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88), set NVCC to its path and rebuild",
                kernels::KERNEL_ORIGIN
            );
        }
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { sys::is_culib_present() } {
            bail!("no NVIDIA driver found (libcuda could not be loaded)");
        }
        let count = CudaContext::device_count().map_err(|e| driver_err("counting GPUs", e))?;
        if count <= 0 {
            bail!("the NVIDIA driver reports no GPU");
        }
        if ordinal >= count as usize {
            bail!("GPU cuda:{ordinal} requested, but only {count} GPU(s) found (cuda:0..cuda:{})", count - 1);
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| anyhow!("CUDA: creating a context on cuda:{ordinal} panicked"))?
            .map_err(|e| driver_err(&format!("creating a context on cuda:{ordinal}"), e))?;
        // One stream and stream-ordered use of every buffer: cudarc's per-buffer event
        // tracking would only add work.
        // SAFETY: all work is issued on the single stream created below.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| driver_err("creating a stream", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_err("querying the SM count", e))? as u32;
        let cc = ctx.compute_capability().map_err(|e| driver_err("querying the compute capability", e))?;
        Ok(Gpu { ctx, stream, name, sm_count, cc, modules: Mutex::default(), functions: Mutex::default() })
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(f.clone());
        }
        let module_name = kernels::module_of(name).ok_or_else(|| anyhow!("unknown kernel `{name}`"))?;
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match modules.get(module_name) {
                Some(m) => m.clone(),
                None => {
                    let m = self.load_module(module_name)?;
                    modules.insert(module_name, m.clone());
                    m
                }
            }
        };
        let f = module.load_function(name).map_err(|e| driver_err(&format!("loading kernel `{name}`"), e))?;
        self.functions.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// The embedded sm_90 cubin on a device of exactly that compute capability (no JIT delay),
    /// else the PTX, which the driver JIT-compiles for this device; also the PTX when the driver
    /// refuses the cubin, so a cubin problem costs load time, never the run.
    fn load_module(&self, module_name: &str) -> Result<Arc<CudaModule>> {
        let cubin_cc = (kernels::CUBIN_CC.0 as i32, kernels::CUBIN_CC.1 as i32);
        if let (Some(cubin), true) = (kernels::cubin_module(module_name), self.cc == cubin_cc) {
            match self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec())) {
                Ok(m) => return Ok(m),
                Err(e) => eprintln!(
                    "warning: the driver refused the sm_{}{} cubin of kernel module `{module_name}` ({e:?}); \
                     JIT-compiling its PTX instead",
                    cubin_cc.0, cubin_cc.1
                ),
            }
        }
        let ptx = kernels::ptx_module(module_name)
            .ok_or_else(|| anyhow!("no PTX for kernel module `{module_name}` in this build"))?;
        self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| {
            anyhow!(
                "CUDA: loading kernel module `{module_name}` failed ({e:?}). The PTX targets compute_90 with \
                 PTX ISA 9.0 (CUDA 13.0): the GPU must be of compute capability 9.0 or newer (this one is {}.{}) \
                 and the driver must support CUDA 13.0",
                self.cc.0,
                self.cc.1
            )
        })
    }
}

impl Exec {
    pub fn sm_count(&self) -> u32 {
        match self {
            Exec::Gpu(g) => g.sm_count,
            // Few "SMs" keep emulated grids small; grid-stride kernels are correct at any size.
            Exec::Emulated => 4,
        }
    }

    /// Launch `name`. Argument count and types are checked against the kernel's signature (parsed
    /// from its source at build time) on both paths.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
        args: &[KArg],
    ) -> Result<()> {
        super::launch_log::record(name, block, shared);
        match self {
            // SAFETY: every pointer argument comes from a live `Buf::Host` of the length the
            // op's geometry implies (checked by the caller in ops/).
            Exec::Emulated => unsafe { emu::launch(name, grid, block, shared, args) },
            Exec::Gpu(g) => {
                let kernel = emu::find_kernel(name).ok_or_else(|| anyhow!("unknown kernel `{name}`"))?;
                emu::check_args(kernel, args)?;
                if args.iter().any(|a| matches!(a, KArg::Host { .. })) {
                    bail!("kernel {name}: a host slice was passed to a GPU launch; pass device buffers");
                }
                emu::check_launch_dims(grid, block, shared)
                    .map_err(|e| anyhow!("kernel {name}: invalid launch: {e}"))?;
                let f = g.function(name)?;
                let packed = PackedArgs::new(args);
                let mut params: Vec<*mut std::ffi::c_void> =
                    (0..packed.len()).map(|i| unsafe { *packed.as_ptr().add(i) }).collect();
                g.ctx.bind_to_thread().map_err(|e| driver_err("binding the context", e))?;
                // SAFETY: the argument list matches the kernel's parsed signature, pointers are
                // live device buffers, and `packed` outlives the call.
                unsafe {
                    cudarc::driver::result::launch_kernel(
                        f.cu_function(),
                        grid,
                        block,
                        shared,
                        g.stream.cu_stream(),
                        &mut params,
                    )
                }
                .map_err(|e| driver_err(&format!("launching `{name}`"), e))
            }
        }
    }

    /// The kernel-argument form of a buffer's address.
    pub fn ptr(&self, b: &Buf) -> KArg {
        match b {
            Buf::Host(v) => KArg::ptr(v.as_ptr()),
            Buf::Gpu(s) => match self {
                Exec::Gpu(g) => {
                    let (p, _sync) = s.device_ptr(&g.stream);
                    KArg::Ptr(p)
                }
                Exec::Emulated => unreachable!("a GPU buffer on the emulated backend"),
            },
        }
    }

    pub fn idx_ptr(&self, b: &IdxBuf) -> KArg {
        match (b, self) {
            (IdxBuf::Host(v), _) => KArg::ptr(v.as_ptr()),
            (IdxBuf::Gpu(s), Exec::Gpu(g)) => KArg::Ptr(s.device_ptr(&g.stream).0),
            (IdxBuf::Gpu(_), Exec::Emulated) => unreachable!("a GPU buffer on the emulated backend"),
        }
    }

    /// An f64 buffer of `len` zeros.
    pub fn zeros_f64(&self, len: usize) -> Result<F64Buf> {
        match self {
            Exec::Emulated => Ok(F64Buf::Host(DeviceMem::filled(len, 0.0))),
            Exec::Gpu(g) => g.stream.alloc_zeros::<f64>(len.max(1)).map(F64Buf::Gpu).map_err(|e| {
                anyhow!(
                    "out of GPU memory allocating {:.1} MiB of f64 on {} ({e:?}); measure fewer layers or \
                     use one value per feature map",
                    len as f64 * 8.0 / (1 << 20) as f64,
                    g.name
                )
            }),
        }
    }

    /// The kernel-argument form of an f64 buffer the kernel writes.
    pub fn f64_ptr_mut(&self, b: &mut F64Buf) -> KArg {
        match (b, self) {
            (F64Buf::Host(v), _) => KArg::ptr_mut(v.as_mut_ptr()),
            (F64Buf::Gpu(s), Exec::Gpu(g)) => KArg::Ptr(s.device_ptr_mut(&g.stream).0),
            (F64Buf::Gpu(_), Exec::Emulated) => unreachable!("a GPU buffer on the emulated backend"),
        }
    }

    /// The first `len` values of an f64 buffer, on the host.
    pub fn download_f64(&self, b: &F64Buf, len: usize) -> Result<Vec<f64>> {
        match (b, self) {
            (F64Buf::Host(v), _) => Ok(v[..len].to_vec()),
            (F64Buf::Gpu(s), Exec::Gpu(g)) => {
                let mut out = vec![0.0f64; len];
                if len > 0 {
                    g.stream
                        .memcpy_dtoh(&s.slice(0..len), &mut out)
                        .map_err(|e| driver_err("copying from the GPU", e))?;
                }
                g.stream.synchronize().map_err(|e| driver_err("waiting for the GPU", e))?;
                Ok(out)
            }
            (F64Buf::Gpu(_), Exec::Emulated) => unreachable!(),
        }
    }

    /// A buffer of `len` values with unspecified contents, from the pool when possible.
    pub fn alloc(&self, pool: &Arc<Pool>, len: usize) -> Result<DeviceBuffer> {
        let (reused, capture) = pool.take(len);
        if reused.is_none() && capture != 0 {
            // A driver allocation inside stream capture would become part of the graph (or fail):
            // the step must find everything in the pool, which a plain step first fills.
            bail!("a {len}-value buffer that the pool does not hold was needed during graph capture");
        }
        let fresh = reused.is_none();
        let buf = match reused {
            // Emulated: a reused buffer is poisoned again, so a kernel that reads an output
            // before writing it sees NaN, not the previous owner's values.
            Some(Buf::Host(mut m)) => {
                m.poison();
                Buf::Host(m)
            }
            Some(b) => b,
            None => match self {
                Exec::Emulated => Buf::Host(DeviceMem::poisoned(len)),
                Exec::Gpu(g) => {
                    // SAFETY: every op writes its whole output before anything reads it.
                    let first = unsafe { g.stream.alloc::<f32>(len.max(1)) };
                    match first {
                        Ok(s) => Buf::Gpu(s),
                        Err(_) => {
                            // Out of memory with idle buffers cached: free them and retry once.
                            pool.clear();
                            let s = unsafe { g.stream.alloc::<f32>(len.max(1)) }.map_err(|e| {
                                anyhow!(
                                    "out of GPU memory allocating {:.1} MiB on {} ({e:?}); try a smaller --batch-size",
                                    len as f64 * 4.0 / (1 << 20) as f64,
                                    g.name
                                )
                            })?;
                            Buf::Gpu(s)
                        }
                    }
                }
            },
        };
        pool.handed_out(len, fresh);
        Ok(DeviceBuffer { buf: Some(buf), len, pool: pool.clone(), capture })
    }

    pub fn upload(&self, pool: &Arc<Pool>, host: &[f32]) -> Result<DeviceBuffer> {
        let mut b = self.alloc(pool, host.len())?;
        match (b.buf_mut(), self) {
            (Buf::Host(v), _) => v[..host.len()].copy_from_slice(host),
            (Buf::Gpu(s), Exec::Gpu(g)) => {
                if !host.is_empty() {
                    let mut view = s.slice_mut(0..host.len());
                    g.stream.memcpy_htod(host, &mut view).map_err(|e| driver_err("copying to the GPU", e))?;
                }
            }
            (Buf::Gpu(_), Exec::Emulated) => unreachable!(),
        }
        Ok(b)
    }

    pub fn download(&self, b: &DeviceBuffer) -> Result<Vec<f32>> {
        match (b.buf(), self) {
            (Buf::Host(v), _) => Ok(v[..b.len()].to_vec()),
            (Buf::Gpu(s), Exec::Gpu(g)) => {
                let mut out = vec![0.0f32; b.len()];
                if b.len() > 0 {
                    g.stream
                        .memcpy_dtoh(&s.slice(0..b.len()), &mut out)
                        .map_err(|e| driver_err("copying from the GPU", e))?;
                }
                g.stream.synchronize().map_err(|e| driver_err("waiting for the GPU", e))?;
                Ok(out)
            }
            (Buf::Gpu(_), Exec::Emulated) => unreachable!(),
        }
    }

    /// Copy batch indices into `slot`, reusing its device buffer when it is large enough, so a
    /// training step allocates nothing. Reuse is safe: the copy is ordered on the stream after
    /// the kernel that read the previous indices.
    pub fn upload_indices(&self, slot: &mut Option<IdxBuf>, idx: &[u32]) -> Result<()> {
        match self {
            // In place when it fits, as on a GPU: a captured graph holds the buffer's address.
            Exec::Emulated => match slot {
                Some(IdxBuf::Host(m)) if m.len() >= idx.len() => m[..idx.len()].copy_from_slice(idx),
                _ => *slot = Some(IdxBuf::Host(DeviceMem::from_slice(idx))),
            },
            Exec::Gpu(g) => {
                if !matches!(slot, Some(IdxBuf::Gpu(s)) if s.len() >= idx.len().max(1)) {
                    let s = g
                        .stream
                        .alloc_zeros::<u32>(idx.len().max(1))
                        .map_err(|e| driver_err("allocating an index buffer", e))?;
                    *slot = Some(IdxBuf::Gpu(s));
                }
                if let (Some(IdxBuf::Gpu(s)), false) = (slot.as_mut(), idx.is_empty()) {
                    let mut view = s.slice_mut(0..idx.len());
                    g.stream.memcpy_htod(idx, &mut view).map_err(|e| driver_err("copying indices to the GPU", e))?;
                }
            }
        }
        Ok(())
    }

    /// dst[..len] = src[..len] on the device: the driver's device-to-device copy (the bandwidth
    /// baseline of the data kernels' benchmarks).
    pub fn copy(&self, src: &DeviceBuffer, dst: &mut DeviceBuffer, len: usize) -> Result<()> {
        if src.len() < len || dst.len() < len {
            anyhow::bail!("copy: buffers of {} and {} values where {len} are needed", src.len(), dst.len());
        }
        match (src.buf(), dst.buf_mut(), self) {
            (Buf::Host(a), Buf::Host(b), _) => b[..len].copy_from_slice(&a[..len]),
            (Buf::Gpu(a), Buf::Gpu(b), Exec::Gpu(g)) => {
                if len > 0 {
                    let mut view = b.slice_mut(0..len);
                    g.stream
                        .memcpy_dtod(&a.slice(0..len), &mut view)
                        .map_err(|e| driver_err("copying on the GPU", e))?;
                }
            }
            _ => anyhow::bail!("copy: buffers from different executors"),
        }
        Ok(())
    }

    /// Milliseconds between two events recorded on the stream around the work `f` queues (wall
    /// clock on the emulator, whose work is done when `f` returns).
    pub fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        match self {
            Exec::Emulated => {
                let t = std::time::Instant::now();
                f()?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            }
            Exec::Gpu(g) => {
                // Timing events: cudarc's default flags disable timing.
                let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
                let start = g.stream.record_event(timed).map_err(|e| driver_err("recording an event", e))?;
                f()?;
                let end = g.stream.record_event(timed).map_err(|e| driver_err("recording an event", e))?;
                let ms = start.elapsed_ms(&end).map_err(|e| driver_err("reading an event timer", e))?;
                Ok(ms as f64)
            }
        }
    }

    pub fn synchronize(&self) -> Result<()> {
        match self {
            Exec::Emulated => Ok(()),
            Exec::Gpu(g) => g.stream.synchronize().map_err(|e| driver_err("waiting for the GPU", e)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Exec::Gpu(g) => format!("cuda:{} {} ({} SMs)", g.ctx.ordinal(), g.name, g.sm_count),
            Exec::Emulated => "cuda-emu (CUDA kernels emulated on the host)".into(),
        }
    }
}
