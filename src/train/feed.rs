//! The training step as one graph replay: a step's varying values fed from device tables.
//!
//! A captured graph replays the same kernels with the same arguments, yet every step needs new
//! batch indices, augmentation matrices, a dropout seed and Adam's bias corrections. So at the
//! start of an epoch the host draws all of them, exactly as the plain loop would draw them step
//! by step (same generators, same order), and uploads them as tables with one row per full
//! batch. A one-word device counter names the current row: the step's first kernels stage
//! their row into fixed buffers (`Backend::feed_stage`), the ops read those, the loss and the
//! predictions are stored into per-step logs (`feed_store`), and the last kernel advances the
//! counter. Per step the host then does one thing: replay the graph. It reads the logs every
//! `READBACK_EVERY` steps, as the plain loop reads its losses.
//!
//! Run order: the run's first two fed steps run with plain launches (they create Adam's moments
//! and fill the buffer pool, which a capture may not allocate from the driver), the third is
//! captured and replayed, every later full batch is one replay. A partial last batch has other shapes and
//! runs through the plain loop in `train::fit`. Where capture fails, the steps go on with plain
//! launches of the same fed step, and the run says why, once. ROTVAR_CUDA_GRAPHS=0 turns
//! graphs off (the fed step still runs, with plain launches), for comparison.

use super::{DeviceDataset, TrainConfig};
use crate::autograd::Tape;
use crate::backend::{BackendRef, Graph, Interp};
use crate::models::Model;
use crate::nn::Forward;
use crate::optim::Optimizer;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::{ops, progress};
use anyhow::{bail, Result};

/// ROTVAR_CUDA_GRAPHS=0: fed steps with plain launches, no capture.
pub const ENV: &str = "ROTVAR_CUDA_GRAPHS";

/// How `train::fit` runs full batches on a backend that has graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Fed and replayed as one graph (the default).
    Replay,
    /// Fed, with plain launches (ROTVAR_CUDA_GRAPHS=0).
    Plain,
    /// The host-valued loop the CPU runs: no feed at all.
    Host,
}

static FORCED: std::sync::Mutex<Option<Mode>> = std::sync::Mutex::new(None);

/// Override the mode for this process (tests and benchmarks compare the three); `None` goes
/// back to ROTVAR_CUDA_GRAPHS.
pub fn force_mode(mode: Option<Mode>) {
    *FORCED.lock().unwrap_or_else(|e| e.into_inner()) = mode;
}

pub fn mode() -> Mode {
    match *FORCED.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(m) => m,
        None if std::env::var(ENV).is_ok_and(|v| v == "0") => Mode::Plain,
        None => Mode::Replay,
    }
}

enum GraphState {
    /// Plain runs still to go before the capture.
    Warmup(usize),
    /// The next run is captured.
    Capture,
    Ready(Graph),
    /// Capture failed or is turned off: plain launches.
    Off,
}

/// Runs a recorded piece of device work (a fed step): with plain launches for `warmup` runs,
/// then captured once and replayed. A failed capture is said once; plain launches follow.
pub struct Replayer {
    state: GraphState,
    what: &'static str,
}

impl Replayer {
    pub fn new(mode: Mode, warmup: usize, what: &'static str) -> Replayer {
        let state = match mode {
            Mode::Replay if warmup == 0 => GraphState::Capture,
            Mode::Replay => GraphState::Warmup(warmup),
            Mode::Plain | Mode::Host => GraphState::Off,
        };
        Replayer { state, what }
    }

    pub fn run(&mut self, be: &BackendRef, record: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        match std::mem::replace(&mut self.state, GraphState::Off) {
            GraphState::Warmup(left) => {
                record()?;
                self.state = if left > 1 { GraphState::Warmup(left - 1) } else { GraphState::Capture };
            }
            GraphState::Capture => match be.capture(record) {
                Ok(Some(g)) => {
                    be.replay(&g)?;
                    self.state = GraphState::Ready(g);
                }
                Ok(None) => record()?,
                Err(e) => {
                    progress::note(None, &format!("note: {} without CUDA graphs (plain launches): {e:#}", self.what));
                    record()?;
                }
            },
            GraphState::Ready(g) => {
                be.replay(&g)?;
                self.state = GraphState::Ready(g);
            }
            GraphState::Off => record()?,
        }
        Ok(())
    }

    /// Kernels one replay runs, once captured.
    pub fn graph_kernels(&self) -> Option<usize> {
        match &self.state {
            GraphState::Ready(g) => Some(g.kernels),
            _ => None,
        }
    }

    pub fn replaying(&self) -> bool {
        matches!(self.state, GraphState::Ready(_))
    }
}

/// Device tables for the full batches of an epoch, and the captured step.
pub struct Feed {
    be: BackendRef,
    batch: usize,
    /// Full batches per epoch: the tables' rows.
    rows: usize,
    perm: Tensor,
    mats: Option<Tensor>,
    seeds: Tensor,
    scalars: Tensor,
    counter: Tensor,
    cur_idx: Tensor,
    cur_mats: Option<Tensor>,
    cur_seed: Tensor,
    cur_scalars: Tensor,
    fill: Tensor,
    loss_log: Tensor,
    pred_log: Tensor,
    replayer: Replayer,
    /// Full batches of the current epoch run so far.
    pub done: usize,
}

fn words(v: impl IntoIterator<Item = u32>) -> Vec<f32> {
    v.into_iter().map(f32::from_bits).collect()
}

impl Feed {
    /// A feed for `train` on its backend, or `None` where the backend has no graphs (the CPU)
    /// or the dataset has no full batch.
    pub fn new(train: &DeviceDataset, cfg: &TrainConfig) -> Result<Option<Feed>> {
        Self::with_mode(train, cfg, mode())
    }

    /// [`Feed::new`] in `mode` rather than the process's.
    pub fn with_mode(train: &DeviceDataset, cfg: &TrainConfig, mode: Mode) -> Result<Option<Feed>> {
        Self::build(train, cfg, mode, train.len() / cfg.batch_size.max(1))
    }

    /// A feed with tables of `rows` steps per epoch (`bench train` runs more steps on one
    /// batch than the dataset has batches).
    pub fn build(train: &DeviceDataset, cfg: &TrainConfig, mode: Mode, rows: usize) -> Result<Option<Feed>> {
        let be = train.images.backend().clone();
        let batch = cfg.batch_size;
        if be.graph_replays().is_none() || rows == 0 || mode == Mode::Host {
            return Ok(None);
        }
        let z = |n: usize| Tensor::zeros(&be, &[n]);
        let augment = !cfg.augment.is_none();
        Ok(Some(Feed {
            perm: z(rows * batch)?,
            mats: augment.then(|| z(rows * batch * 6)).transpose()?,
            seeds: z(rows * 2)?,
            scalars: z(rows * 6)?,
            counter: z(1)?,
            cur_idx: z(batch)?,
            cur_mats: augment.then(|| z(batch * 6)).transpose()?,
            cur_seed: z(2)?,
            cur_scalars: z(6)?,
            fill: Tensor::from_vec(&be, &[train.fill.len()], &train.fill)?,
            loss_log: z(rows)?,
            pred_log: z(rows * batch)?,
            replayer: Replayer::new(mode, 2, "training"),
            done: 0,
            be,
            batch,
            rows,
        }))
    }

    /// Full batches per epoch.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Draw and upload the values of the epoch's full batches: `order` is the epoch's shuffled
    /// order, `step_seed(j)` the dropout seed of step j. Augmentation is drawn from `augment_rng`
    /// batch by batch, as the plain loop draws it, so a partial last batch drawn afterwards gets
    /// the values it would get without the feed.
    pub fn begin_epoch(
        &mut self,
        order: &[u32],
        cfg: &TrainConfig,
        augment_rng: &mut Rng,
        optimizer: &Optimizer,
        step_seed: impl Fn(usize) -> u64,
    ) -> Result<()> {
        let (b, rows) = (self.batch, self.rows);
        if order.len() / b != rows {
            bail!("internal: an epoch of {} images is not {rows} batches of {b}", order.len());
        }
        let s = |t: &mut Tensor, v: &[f32]| self.be.upload_into(&mut t.storage_mut(), v);
        s(&mut self.perm, &words(order[..rows * b].iter().copied()))?;
        if let Some(m) = self.mats.as_mut() {
            let mats: Vec<f32> = (0..rows).flat_map(|_| cfg.augment.draw(b, augment_rng)).flatten().collect();
            if mats.iter().any(|v| !v.is_finite()) {
                bail!("augmentation drew a sampling matrix that is not finite");
            }
            s(m, &mats)?;
        }
        s(&mut self.seeds, &words((0..rows).map(step_seed).flat_map(|z| [z as u32, (z >> 32) as u32])))?;
        s(&mut self.scalars, &optimizer.fed_scalars(rows))?;
        s(&mut self.counter, &[0.0])?;
        self.done = 0;
        Ok(())
    }

    /// Run the epoch's next full batch: plain, captured and replayed, or replayed.
    pub fn step(&mut self, model: &Model, train: &DeviceDataset, optimizer: &mut Optimizer) -> Result<()> {
        if self.done >= self.rows {
            bail!("internal: more fed steps than the epoch's {} full batches", self.rows);
        }
        let be = self.be.clone();
        let mut replayer = std::mem::replace(&mut self.replayer, Replayer::new(Mode::Plain, 0, ""));
        let ran = replayer.run(&be, &mut || self.record(model, train, optimizer));
        self.replayer = replayer;
        ran?;
        optimizer.count_step();
        self.done += 1;
        Ok(())
    }

    /// Kernels one replay runs, once the step is captured.
    pub fn graph_kernels(&self) -> Option<usize> {
        self.replayer.graph_kernels()
    }

    /// Whether steps replay a captured graph.
    pub fn replaying(&self) -> bool {
        self.replayer.replaying()
    }

    /// The fed step's launches, top to bottom.
    fn record(&self, model: &Model, train: &DeviceDataset, optimizer: &mut Optimizer) -> Result<()> {
        let (be, b, rows) = (&self.be, self.batch, self.rows);
        let stage = |table: &Tensor, cur: &Tensor, n: usize| {
            be.feed_stage(&table.storage(), rows, &self.counter.storage(), &mut cur.storage_mut(), n)
        };
        stage(&self.perm, &self.cur_idx, b)?;
        let [c, h, w] = train.item_shape;
        let mut xs = be.alloc(b * c * h * w)?;
        be.gather_rows_fed(&train.images.storage(), c * h * w, &self.cur_idx.storage(), b, &mut xs)?;
        let mut ys = be.alloc(b)?;
        be.gather_rows_fed(&train.labels.storage(), 1, &self.cur_idx.storage(), b, &mut ys)?;
        let mut x = Tensor::from_storage(be, &[b, c, h, w], xs, false)?;
        let y = Tensor::from_storage(be, &[b], ys, false)?;
        if let (Some(table), Some(cur)) = (&self.mats, &self.cur_mats) {
            stage(table, cur, 6 * b)?;
            x = ops::warp_fed(&x, cur, Interp::Bilinear, &self.fill)?;
        }
        stage(&self.seeds, &self.cur_seed, 2)?;
        let tape = Tape::start()?;
        let logp = model.forward(&x, &mut Forward::train_fed(self.cur_seed.clone()))?;
        let loss = ops::nll_loss(&logp, &y)?;
        let grads = tape.backward(&loss)?;
        stage(&self.scalars, &self.cur_scalars, 6)?;
        optimizer.step_fed(&grads, &self.cur_scalars)?;
        let preds = super::device_predictions(&logp)?;
        let counter = self.counter.storage();
        be.feed_store(&loss.storage(), &counter, &mut self.loss_log.storage_mut(), rows, 1)?;
        be.feed_store(&preds, &counter, &mut self.pred_log.storage_mut(), rows, b)?;
        drop(counter);
        be.feed_advance(&mut self.counter.storage_mut())
    }

    /// The losses and predictions of the epoch's full batches so far: (loss of batch j, its
    /// predicted classes).
    pub fn logs(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.loss_log.to_vec()?, self.pred_log.to_vec()?))
    }

    pub fn batch(&self) -> usize {
        self.batch
    }
}
