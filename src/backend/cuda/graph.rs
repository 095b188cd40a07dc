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

use super::device::{Buf, CapturedMemory, IdxBuf, Pool};
use super::emu::KArg;
use std::sync::Arc;

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
