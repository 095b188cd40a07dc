//! CUDA graphs: a step's launches captured once and replayed with one call.
//!
//! On a GPU this is stream capture of the backend's single stream (cuStreamBeginCapture,
//! cuGraphInstantiate, cuGraphLaunch through cudarc). Under the emulator a capture records each
//! launch (kernel, grid, block, shared bytes, arguments) and a replay runs them in order, after
//! poisoning every buffer the graph owns: a kernel that reads a temporary before this replay
//! wrote it sees NaN, as it would see garbage on a GPU.
//!
//! Both follow CUDA's rules, so a step that would break capture on a GPU breaks it in CI:
//! - captured work does not run until it is replayed;
//! - only kernel launches and buffers taken from the pool may happen inside; a host transfer,
//!   a synchronization or a driver allocation is an error (`CudaBackend::not_capturing`,
//!   `Exec::alloc`);
//! - the buffers freed inside (the step's temporaries) belong to the graph while it lives,
//!   since its kernels address them on every replay; a buffer handed out inside and still alive
//!   at the end fails the capture, as a replay would write it under its new owner.
//!
//! The multi-tensor Adam table is the one value a capture fixes that the host must supply: its
//! content (the addresses of the step's gradients) is known only once the step has been
//! recorded, so it is written to the graph's own table buffer after capture ends.

use super::device::{Buf, CapturedMemory, Exec, IdxBuf, Pool};
use super::emu::{self, KArg};
use super::{CudaBackend, Dim};
use crate::backend::Graph;
use anyhow::{bail, Result};
use std::sync::{Arc, Mutex};

/// One recorded launch (emulator).
pub(super) struct Launch {
    pub name: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared: u32,
    pub args: Vec<KArg>,
}

/// The state of a capture in progress.
pub(super) struct Capture {
    /// Emulator: the launches recorded so far (on a GPU the stream records them).
    pub launches: Vec<Launch>,
    pub kernels: usize,
    /// The graph's Adam table (allocated before capture began) and what it must hold.
    pub adam_table: Option<IdxBuf>,
    pub adam_words: Option<Vec<u32>>,
}

impl Capture {
    /// Emulator: check a launch now, as cuLaunchKernel checks during capture (not at the first
    /// replay), and record it.
    fn record(&mut self, name: &str, grid: Dim, block: Dim, shared: u32, args: &[KArg]) -> Result<()> {
        let kernel = emu::find_kernel(name).ok_or_else(|| anyhow::anyhow!("unknown kernel `{name}`"))?;
        emu::check_args(kernel, args)?;
        emu::check_launch_dims(grid, block, shared)
            .map_err(|e| anyhow::anyhow!("kernel {name}: invalid launch: {e}"))?;
        if args.iter().any(|a| matches!(a, KArg::Host { .. })) {
            bail!("kernel {name}: a host slice cannot be part of a captured graph");
        }
        self.launches.push(Launch { name: name.to_string(), grid, block, shared, args: args.to_vec() });
        Ok(())
    }
}

/// cudarc's graph holds raw driver handles and is not marked `Send`/`Sync`.
pub(super) struct GpuGraph(pub cudarc::driver::CudaGraph);
// SAFETY: the graph is launched only on the backend's single stream, with its context bound by
// cudarc before every launch; the driver's graph-exec handles may be used from any thread.
unsafe impl Send for GpuGraph {}
unsafe impl Sync for GpuGraph {}

pub(super) enum Recorded {
    Gpu(GpuGraph),
    Emulated(Vec<Launch>),
}

/// A captured graph of the CUDA backend (the inside of `backend::Graph`).
pub(super) struct CudaGraph {
    pub recorded: Recorded,
    /// Buffers the graph's kernels address, kept from the pool while it lives.
    pub owned: Vec<(usize, Buf)>,
    /// Held for its address, which the recorded Adam launch reads.
    _adam_table: Option<IdxBuf>,
    pub pool: Arc<Pool>,
}

impl CudaGraph {
    pub fn new(recorded: Recorded, mem: CapturedMemory, adam_table: Option<IdxBuf>, pool: Arc<Pool>) -> Self {
        CudaGraph { recorded, owned: mem.buffers, _adam_table: adam_table, pool }
    }

    /// Emulator: the owned buffers back to poison before a replay.
    pub fn poison_owned(&mut self) {
        for (_, b) in &mut self.owned {
            if let Buf::Host(m) = b {
                m.poison();
            }
        }
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.owned));
    }
}

impl CudaBackend {
    /// A launch while a graph is captured: recorded (emulator) or issued into the capturing
    /// stream (GPU), and counted as the graph's; `None` outside capture.
    pub(super) fn captured_launch(
        &self,
        name: &str,
        grid: Dim,
        block: Dim,
        shared: u32,
        args: &[KArg],
    ) -> Option<Result<()>> {
        let mut cap = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        let c = cap.as_mut()?;
        c.kernels += 1;
        if !self.is_emulated() {
            return Some(self.exec.launch(name, grid, block, shared, args)); // the stream records it
        }
        Some(c.record(name, grid, block, shared, args))
    }

    /// An error naming `what` while a graph is being captured: host transfers and
    /// synchronization cannot be part of a graph (CUDA stream capture refuses them too).
    pub(super) fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capture.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            bail!("{what} cannot be part of a captured graph (it moves data between host and device or waits)");
        }
        Ok(())
    }

    /// `Backend::capture`: stream capture on a GPU, a recorded launch list under the emulator.
    pub(super) fn capture_graph(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Graph> {
        self.not_capturing("a capture")?;
        // The graph's own Adam table, as large as the plain step's (graph.rs).
        let words = self.adam_table.lock().unwrap_or_else(|e| e.into_inner()).host.len();
        let mut adam_table = None;
        if words > 0 {
            self.exec.upload_indices(&mut adam_table, &vec![0u32; words])?;
        }
        *self.capture.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Capture { launches: Vec::new(), kernels: 0, adam_table, adam_words: None });
        self.pool.begin_capture();
        let began = match &self.exec {
            Exec::Gpu(g) => g
                .stream
                .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| anyhow::anyhow!("CUDA: beginning stream capture failed: {e:?}")),
            Exec::Emulated => Ok(()),
        };
        let ran = began.and_then(|()| f());
        let gpu = match &self.exec {
            Exec::Gpu(g) => Some(g.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))),
            Exec::Emulated => None,
        };
        let mem = self.pool.end_capture();
        let cap = self.capture.lock().unwrap_or_else(|e| e.into_inner()).take();
        let cap = cap.ok_or_else(|| anyhow::anyhow!("internal: the capture state vanished"))?;
        let recorded = match (ran, gpu) {
            (Err(e), _) => Err(e),
            _ if mem.outstanding != 0 => Err(anyhow::anyhow!(
                "{} buffer(s) handed out during the captured step are still alive after it",
                mem.outstanding
            )),
            (Ok(()), None) => Ok(Recorded::Emulated(cap.launches)),
            (Ok(()), Some(Ok(Some(g)))) => Ok(Recorded::Gpu(GpuGraph(g))),
            (Ok(()), Some(Ok(None))) => Err(anyhow::anyhow!("CUDA: stream capture produced no graph")),
            (Ok(()), Some(Err(e))) => Err(anyhow::anyhow!("CUDA: ending stream capture failed: {e:?}")),
        };
        let recorded = match recorded {
            Ok(r) => r,
            Err(e) => {
                self.pool.give_back(mem.buffers);
                return Err(e.context("graph capture failed"));
            }
        };
        let mut adam_table = cap.adam_table;
        if let Some(words) = cap.adam_words {
            self.exec.upload_indices(&mut adam_table, &words)?;
        }
        let kernels = cap.kernels;
        let g = CudaGraph::new(recorded, mem, adam_table, self.pool.clone());
        Ok(Graph { inner: Box::new(Mutex::new(g)), kernels })
    }

    /// `Backend::replay`: one graph launch; under the emulator the recorded launches, after
    /// poisoning the graph's buffers.
    pub(super) fn replay_graph(&self, g: &Graph) -> Result<()> {
        self.not_capturing("a graph replay")?;
        let g = g.inner.downcast_ref::<Mutex<CudaGraph>>().ok_or_else(|| anyhow::anyhow!("not a CUDA graph"))?;
        let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&g.pool, &self.pool) {
            bail!("a graph captured by another CUDA backend cannot be replayed here");
        }
        match &g.recorded {
            Recorded::Gpu(gg) => gg.0.launch().map_err(|e| anyhow::anyhow!("CUDA: launching a graph failed: {e:?}"))?,
            Recorded::Emulated(_) => {
                g.poison_owned();
                if let Recorded::Emulated(launches) = &g.recorded {
                    for l in launches {
                        self.exec.launch(&l.name, l.grid, l.block, l.shared, &l.args)?;
                    }
                }
            }
        }
        self.replays.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
