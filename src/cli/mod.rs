//! The `rotvar` command line: argument parsing and one function per command.

mod rank;
mod study;
mod tools;
mod track;

use crate::angle_eval;
use crate::augment::Augment;
use crate::backend::cpu::conv as cpu_conv;
use crate::backend::cpu::isa as cpu_isa;
use crate::backend::MapReduce;
use crate::backend::{self, BackendRef, DeviceRequest, Precision};
use crate::checkpoint;
use crate::data::{self, Split};
use crate::experiment;
use crate::figures;
use crate::fsio::{self, write_atomic, write_json};
use crate::limits;
use crate::measure::job::{self, MeasureOptions};
use crate::measure::{self, output, Per};
use crate::optim::{OptimConfig, OptimizerKind};
use crate::run::{self, DataSource, PairOptions};
use crate::train::{self, DeviceDataset, TrainConfig};
use crate::transform::TransformSet;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;
use study::{cmd_eval, cmd_eval_merge, cmd_measure, cmd_measure_merge, cmd_measure_pair};

#[derive(Parser)]
#[command(
    name = "rotvar",
    version,
    about = "How invariant to rotation is a CNN, and where inside it?",
    after_help = "Documentation: docs/ in the rotvar source tree: docs/protocol.md (the study and its \
                  defaults), docs/measure.md (V = V_t / V_x and its output files), docs/transformations.md \
                  (rotation convention, --augment), docs/reproduce.md (commands and published numbers)."
)]
struct Cli {
    #[arg(long, global = true, allow_hyphen_values = true, value_parser = limits::THREADS.usize_parser(),
          help = limits::THREADS.help("CPU threads for the CPU backend (default: all cores)"))]
    threads: Option<usize>,
    /// The CPU backend's matrix multiply: rotvar's own kernels at the widest width this CPU runs
    /// (auto, the default; the gemm crate on CPUs without AVX2), or at a chosen one (avx512,
    /// avx2, portable), or the gemm crate's kernels (crate). rotvar's three give the same bits, so results do not depend on
    /// the machine's vector width; the crate's differ from them.
    #[arg(long, global = true, env = "ROTVAR_CPU_GEMM", default_value = "auto")]
    cpu_gemm: String,
    /// The CPU backend's convolutions: winograd (F(4×4,r×r) on the 3×3 and 5×5 stride-1 "same"
    /// layers with at least 8 channels in and out, 4× and 6.25× fewer multiplications; direct
    /// kernels on the stride-1 layers with fewer channels, such as LeNet's conv1 and conv2 and
    /// the first layer's weight gradient; im2col + GEMM elsewhere), winograd-f2 (F(2×2,r×r),
    /// direct kernels alike), or im2col everywhere (the reference; the others round
    /// differently, within about 1e-5 of it). Each is deterministic.
    #[arg(long, global = true, env = "ROTVAR_CPU_CONV", default_value = "winograd")]
    cpu_conv: String,
    /// Arithmetic of the convolutions and dense layers: fp32 (the default and the reference: V
    /// and the published numbers are fp32); tf32 or bf16 (operands rounded, sums in fp32: tensor
    /// cores on the GPU, the same rounding on the CPU); 3xtf32 (tensor cores at about fp32's
    /// accuracy; plain fp32 on the CPU). Weights, optimizer state, batch norm, the loss and the
    /// variance moments stay fp32 in every mode.
    #[arg(long, global = true, env = "ROTVAR_PRECISION", default_value = "fp32")]
    precision: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model and write a checkpoint and metrics.
    Train(TrainArgs),
    /// Train the unrotated and the rotated model of the reference protocol into one run directory.
    TrainPair(TrainPairArgs),
    /// Evaluate a checkpoint on a test set.
    Eval(EvalArgs),
    /// Measure V = V_t / V_x for every unit of every layer of a checkpoint (see docs/measure.md).
    Measure(MeasureArgs),
    /// Measure both models of a `train-pair` run directory and compare them.
    MeasurePair(MeasurePairArgs),
    /// Combine the shard files of `measure --shard K/N` into the result of one whole run.
    MeasureMerge(MeasureMergeArgs),
    /// Combine the shard files of `eval --angles ... --shard K/N` into one evaluation.
    EvalMerge(MeasureMergeArgs),
    /// The whole study in one command: train the pair, accuracy versus angle, V for both models,
    /// every figure and a report.md.
    Experiment(ExperimentArgs),
    /// Does a network encode zoom? A RankNet head per layer of frozen backbones ranks two
    /// zoomed copies of an image (docs/rank-study.md).
    Rank(rank::RankArgs),
    /// Write a PNG grid of test images and their rotations.
    Images(ImagesArgs),
    /// Show the build, its features and the devices found.
    Info,
    /// Every model: parameters and per-layer output shapes for MNIST and CIFAR-10 inputs.
    Models(ModelsArgs),
    /// Download a dataset into the data directory and verify it.
    Fetch(FetchArgs),
    /// Check every GPU kernel against the CPU reference and compare LeNet training curves.
    Selftest(SelftestArgs),
    /// Benchmarks: training throughput (JSON lines, comparable with benches/torch_reference.py).
    Bench(BenchArgs),
}

#[derive(Args)]
struct SelftestArgs {
    /// The device to check: cuda, cuda:N, or cuda-emu (emulated kernels, small problems).
    #[arg(long, default_value = "cuda")]
    device: DeviceRequest,
    #[arg(long, default_value_t = 300, allow_hyphen_values = true, value_parser = limits::SELFTEST_STEPS.usize_parser(),
          help = limits::SELFTEST_STEPS.help("LeNet training steps compared between the CPU and the device"))]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The emulated run's small problems and batch on a GPU too: for compute-sanitizer, which
    /// checks every access and would take minutes over the full sizes.
    #[arg(long)]
    small: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// What to measure: train (whole training steps), conv (each convolution pass), gemm (the
    /// CUDA GEMM variants and the fused bias + ReLU epilogue; on the CPU, rotvar's vector paths
    /// next to the gemm crate on one core, then each dense layer's passes whole), rotate
    /// (rotation kernel vs device-to-device copy), eval-angles (rotated evaluation), measure
    /// (the variance measure's cost over the rotated forward passes).
    #[arg(default_value = "train")]
    what: String,
    #[arg(long, default_value_t = 10000, allow_hyphen_values = true, value_parser = limits::BENCH_IMAGES.usize_parser(),
          help = limits::BENCH_IMAGES.help("Images for rotate, eval-angles and measure"))]
    images: usize,
    #[arg(long, default_value_t = 16, allow_hyphen_values = true, value_parser = limits::BENCH_ANGLES.usize_parser(),
          help = limits::BENCH_ANGLES.help("Angles (eval-angles) or rotations (measure)"))]
    angles: usize,
    /// Units of the measure benchmark.
    #[arg(long, value_enum, default_value_t = Per::Map)]
    per: Per,
    /// Comma-separated models (for `conv`: whose layer shapes to time, of lenet, simpleconv,
    /// resnet18, or single layers such as lenet.conv2).
    #[arg(long, default_value = "lenet,simpleconv")]
    models: String,
    #[arg(long, default_value_t = 256, allow_hyphen_values = true, value_parser = limits::TRAIN_BATCH.usize_parser(),
          help = limits::TRAIN_BATCH.help("Images per step"))]
    batch_size: usize,
    #[arg(long, default_value_t = 20, allow_hyphen_values = true, value_parser = limits::BENCH_STEPS.usize_parser(),
          help = limits::BENCH_STEPS.help("Timed steps"))]
    steps: usize,
    #[arg(long, default_value_t = 3, allow_hyphen_values = true, value_parser = limits::BENCH_WARMUP.usize_parser(),
          help = limits::BENCH_WARMUP.help("Untimed steps first"))]
    warmup: usize,
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
}

#[derive(Args, Clone)]
struct DataArgs {
    /// Dataset: mnist, mnist-sample (bundled, offline) or cifar10.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Data directory (default: $ROTVAR_DATA, else ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Smaller runs on the first images of each split.
#[derive(Args, Clone, Copy)]
struct SubsetArgs {
    #[arg(long, allow_hyphen_values = true, value_parser = limits::TRAIN_LIMIT.usize_parser(),
          help = limits::TRAIN_LIMIT.help("Train on the first N training images only"))]
    limit: Option<usize>,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::TEST_LIMIT.usize_parser(),
          help = limits::TEST_LIMIT.help("Evaluate on the first N test images only"))]
    test_limit: Option<usize>,
}

impl SubsetArgs {
    fn source(self, dataset: &str, data_dir: Option<&Path>) -> DataSource {
        DataSource {
            dataset: dataset.into(),
            data_dir: data_dir.map(Path::to_path_buf),
            train_limit: self.limit,
            test_limit: self.test_limit,
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    /// Model architecture: lenet, simpleconv, allconv, vgg (VGG-like), vgg16, resnet18, resnet20, convbn.
    #[arg(long, default_value = "simpleconv")]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 5, allow_hyphen_values = true, value_parser = limits::EPOCHS.usize_parser(),
          help = limits::EPOCHS.help("Epochs to train (with --resume: the total, counting those already done)"))]
    epochs: usize,
    #[arg(long, default_value_t = 256, allow_hyphen_values = true, value_parser = limits::TRAIN_BATCH.usize_parser(),
          help = limits::TRAIN_BATCH.help("Images per training step"))]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true, value_parser = limits::LR.f32_parser(),
          help = limits::LR.help("Learning rate"))]
    lr: f32,
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adam)]
    optimizer: OptimizerKind,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true, value_parser = limits::WEIGHT_DECAY.f32_parser(),
          help = limits::WEIGHT_DECAY.help("L2 weight decay, applied only to parameters that are not 1-D (not biases or norms)"))]
    weight_decay: f32,
    #[arg(long, default_value_t = 0.9, allow_hyphen_values = true, value_parser = limits::MOMENTUM.f32_parser(),
          help = limits::MOMENTUM.help("SGD momentum"))]
    momentum: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Augmentation drawn per image per step: none, or a comma-separated list of rotate
    /// (uniform in [-180°, 180°)), rotate=LO:HI, zoom=LO:HI, hflip, vflip (see
    /// docs/transformations.md).
    #[arg(long, default_value = "none")]
    augment: Augment,
    /// auto, cpu, cuda, cuda:N (or cuda-emu: GPU kernels emulated on the host, slow).
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    /// Output directory for model.safetensors and metrics.json (default: runs/MODEL-DATASET).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory up to --epochs in total, with its saved configuration
    /// (weights, optimizer moments, random streams and metrics are restored: the result is the
    /// same as an uninterrupted run's).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = [
        "model", "dataset", "batch_size", "lr", "optimizer", "weight_decay", "momentum", "seed",
        "augment", "out", "limit", "test_limit", "overwrite"])]
    resume: Option<PathBuf>,
    /// Replace the checkpoint already in --out (without it, rotvar refuses to overwrite a run).
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    track: track::TrackArgs,
    #[command(flatten)]
    subset: SubsetArgs,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct TrainPairArgs {
    /// Model architecture: lenet, simpleconv, allconv, vgg (VGG-like), vgg16, resnet18, resnet20, convbn.
    #[arg(long, default_value = "simpleconv")]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::EPOCHS.usize_parser(),
          help = limits::EPOCHS.help("Epochs of the unrotated model (default: the reference protocol's, e.g. 5 for SimpleConv on MNIST)"))]
    epochs: Option<usize>,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::ROTATED_EPOCHS.usize_parser(),
          help = limits::ROTATED_EPOCHS.help("Epochs of the rotated model (default: the reference protocol's, e.g. 15 for SimpleConv on MNIST)"))]
    rotated_epochs: Option<usize>,
    #[arg(long, default_value_t = 256, allow_hyphen_values = true, value_parser = limits::TRAIN_BATCH.usize_parser(),
          help = limits::TRAIN_BATCH.help("Images per training step"))]
    batch_size: usize,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::LR.f32_parser(),
          help = limits::LR.help("Learning rate (default: the reference protocol's: 1e-3, or 1e-5 for VGG and ResNet)"))]
    lr: Option<f32>,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true, value_parser = limits::WEIGHT_DECAY.f32_parser(),
          help = limits::WEIGHT_DECAY.help("L2 weight decay, applied only to parameters that are not 1-D"))]
    weight_decay: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    /// Run directory (default: runs/MODEL-DATASET-pair). A member already there with the same
    /// configuration is continued (or reused, when finished).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Retrain members already in the run directory instead of continuing them.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    track: track::TrackArgs,
    #[command(flatten)]
    subset: SubsetArgs,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset (default: the one the checkpoint was trained on).
    #[arg(long)]
    dataset: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1000, allow_hyphen_values = true, value_parser = limits::EVAL_BATCH.usize_parser(),
          help = limits::EVAL_BATCH.help("Images per forward pass"))]
    batch_size: usize,
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::EVAL_LIMIT.usize_parser(),
          help = limits::EVAL_LIMIT.help("Evaluate on the first N test images only"))]
    limit: Option<usize>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Evaluate on the test set rotated by each angle: a list (0,90,180,270), a range
    /// START:STOP:STEP in degrees (0:360:45, STOP excluded) or a count (16, evenly spaced).
    #[arg(long, conflicts_with = "transform")]
    angles: Option<String>,
    /// Evaluate on the test set under each point of a grid of transformations. One axis per
    /// flag; repeat it for every combination of several: rotate=SPEC (as --angles),
    /// zoom=LO:HI:N (N factors from LO to HI; > 1 enlarges), translate=LO:HI:N (pixels right),
    /// translate-y=LO:HI:N (pixels down), hflip, vflip. Lists work too: zoom=0.5,1,2.
    #[arg(long, value_name = "AXIS", allow_hyphen_values = true)]
    transform: Vec<String>,
    /// With --angles or --transform: directory for the JSON, CSV and plots (angles.* for
    /// rotations, transform.* otherwise; default: beside the checkpoint).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the randomly transformed test set: a random angle per image for rotations, a
    /// random point of the grid otherwise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// With --angles or --transform: evaluate only the K-th of N slices of the test set (whole
    /// batches of --batch-size) and write angles.shard-K-of-N.json (transform.shard-K-of-N.json);
    /// `rotvar eval-merge` combines them.
    #[arg(long, value_name = "K/N")]
    shard: Option<measure::shard::Shard>,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Clone)]
struct MeasureOpts {
    #[arg(long, default_value_t = 16, conflicts_with = "transform", allow_hyphen_values = true, value_parser = limits::ROTATIONS.usize_parser(),
          help = limits::ROTATIONS.help("Rotations, evenly spaced over 360° from -180° (the reference: 16, i.e. every 22.5°)"))]
    rotations: usize,
    /// Measure V over a grid of transformations instead of rotations, as `eval --transform`:
    /// one axis per flag (rotate=SPEC, zoom=LO:HI:N, translate=LO:HI:N, translate-y=LO:HI:N,
    /// hflip, vflip), every combination of several.
    #[arg(long, value_name = "AXIS", allow_hyphen_values = true)]
    transform: Vec<String>,
    /// Units: every element of every feature map, or one per feature map (H×W reduced).
    #[arg(long, value_enum, default_value_t = Per::Map)]
    per: Per,
    /// How a feature map is reduced to one value with --per map.
    #[arg(long, value_enum, default_value_t = MapReduce::Mean)]
    reduce: MapReduce,
    #[arg(long, default_value_t = 256, allow_hyphen_values = true, value_parser = limits::EVAL_BATCH.usize_parser(),
          help = limits::EVAL_BATCH.help("Test images per forward pass"))]
    batch_size: usize,
    /// Dataset (default: the one the checkpoint was trained on).
    #[arg(long)]
    dataset: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::EVAL_LIMIT.usize_parser(),
          help = limits::EVAL_LIMIT.help("Measure on the first N test images only"))]
    limit: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    #[arg(long)]
    quiet: bool,
}

impl MeasureOpts {
    fn options(&self) -> Result<MeasureOptions> {
        let transforms = (!self.transform.is_empty()).then(|| TransformSet::parse(&self.transform)).transpose()?;
        Ok(MeasureOptions {
            rotations: self.rotations,
            transforms,
            per: self.per,
            reduce: self.reduce,
            batch: self.batch_size,
            dataset: self.dataset.clone(),
            data_dir: self.data_dir.clone(),
            limit: self.limit,
            quiet: self.quiet,
        })
    }
}

#[derive(Args)]
struct MeasureArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory for variance.safetensors, variance.json and plots (default: beside the checkpoint).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure only the K-th of N slices of the test set (K from 1; whole batches of
    /// --batch-size) and write its moments to variance.shard-K-of-N.safetensors; `rotvar
    /// measure-merge` combines the N shards into what one run with the same --batch-size gives.
    #[arg(long, value_name = "K/N")]
    shard: Option<measure::shard::Shard>,
    #[command(flatten)]
    opts: MeasureOpts,
}

#[derive(Args)]
struct MeasureMergeArgs {
    /// Shard files, all N of one run, in any order (variance.shard-K-of-N.safetensors from
    /// `measure`, angles.shard-K-of-N.json from `eval --angles`).
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    /// Output directory for the merged results (those of the unsharded command, and its figures).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct MeasurePairArgs {
    /// A run directory written by `rotvar train-pair`.
    run_dir: PathBuf,
    #[command(flatten)]
    opts: MeasureOpts,
}

#[derive(Args)]
struct ExperimentArgs {
    /// LeNet on the bundled MNIST sample with short schedules: the whole study in about a minute
    /// on a CPU. Other options still apply on top.
    #[arg(long)]
    quick: bool,
    /// Model architecture: lenet, simpleconv, allconv, vgg, vgg16, resnet18, resnet20, convbn (default:
    /// simpleconv; lenet with --quick).
    #[arg(long)]
    model: Option<String>,
    /// Dataset (default: mnist; mnist-sample with --quick).
    #[arg(long)]
    dataset: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run directory; models already trained there with the same configuration are reused, and
    /// an interrupted one continues where it stopped.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Retrain the models already in the run directory instead of reusing or continuing them.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::EPOCHS.usize_parser(),
          help = limits::EPOCHS.help("Epochs of the unrotated model (default: the reference protocol's)"))]
    epochs: Option<usize>,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::ROTATED_EPOCHS.usize_parser(),
          help = limits::ROTATED_EPOCHS.help("Epochs of the rotated model (default: the reference protocol's)"))]
    rotated_epochs: Option<usize>,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::LR.f32_parser(),
          help = limits::LR.help("Learning rate (default: the reference protocol's)"))]
    lr: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Angles of the accuracy-versus-angle evaluation (see `eval --angles`).
    #[arg(long, default_value = "0:360:15")]
    angles: String,
    #[arg(long, default_value_t = 16, allow_hyphen_values = true, value_parser = limits::ROTATIONS.usize_parser(),
          help = limits::ROTATIONS.help("Rotations of the variance measure"))]
    rotations: usize,
    #[arg(long, value_enum, default_value_t = Per::Map)]
    per: Per,
    #[arg(long, value_enum, default_value_t = MapReduce::Mean)]
    reduce: MapReduce,
    #[command(flatten)]
    subset: SubsetArgs,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::MEASURE_LIMIT.usize_parser(),
          help = limits::MEASURE_LIMIT.help("Measure V on the first N test images only (default: all; 500 with --quick)"))]
    measure_limit: Option<usize>,
    /// Also measure V every N epochs while each model trains (same settings and images as the
    /// final measure): metrics.json of each model and figures/variance_during_training_*.png.
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = limits::EPOCHS.usize_parser())]
    measure_every: Option<usize>,
    /// Also evaluate both models over a grid of transformations, as `eval --transform` (one
    /// axis per flag): a figure and a section of report.md.
    #[arg(long, value_name = "AXIS", allow_hyphen_values = true)]
    transform: Vec<String>,
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct ImagesArgs {
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 8, allow_hyphen_values = true, value_parser = limits::IMAGES_COUNT.usize_parser(),
          help = limits::IMAGES_COUNT.help("Number of test images (rows)"))]
    count: usize,
    /// Rotations (columns), as `eval --angles`.
    #[arg(long, default_value = "0:360:45")]
    angles: String,
    /// Output PNG.
    #[arg(long, default_value = "rotations.png")]
    out: PathBuf,
}

#[derive(Args)]
struct ModelsArgs {
    /// Only this model (default: all).
    model: Option<String>,
    /// Print JSON (one object per model and input) instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FetchArgs {
    /// Dataset to download (mnist).
    dataset: String,
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot configure the CPU thread pool")?;
    }
    let isa = cpu_isa::parse(&cli.cpu_gemm).context("--cpu-gemm (or ROTVAR_CPU_GEMM)")?;
    cpu_isa::choose(isa)?;
    cpu_conv::choose_algo(cpu_conv::parse_algo(&cli.cpu_conv).context("--cpu-conv (or ROTVAR_CPU_CONV)")?);
    let precision = Precision::parse(&cli.precision).context("--precision (or ROTVAR_PRECISION)")?;
    PRECISION.set(precision).ok();
    match cli.command {
        Command::Train(a) => cmd_train(a),
        Command::TrainPair(a) => cmd_train_pair(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Measure(a) => cmd_measure(a),
        Command::MeasurePair(a) => cmd_measure_pair(a),
        Command::MeasureMerge(a) => cmd_measure_merge(a),
        Command::EvalMerge(a) => cmd_eval_merge(a),
        Command::Experiment(a) => cmd_experiment(a),
        Command::Rank(a) => rank::cmd_rank(a),
        Command::Images(a) => cmd_images(a),
        Command::Info => tools::cmd_info(),
        Command::Models(a) => tools::cmd_models(a),
        Command::Fetch(a) => cmd_fetch(a),
        Command::Bench(a) => tools::cmd_bench(a),
        Command::Selftest(a) => tools::cmd_selftest(a),
    }
}

/// `--precision`, set once in `run` before any command.
static PRECISION: OnceLock<Precision> = OnceLock::new();

fn precision() -> Precision {
    PRECISION.get().copied().unwrap_or_default()
}

/// The backend of `req`, in the precision `--precision` chose.
fn open_backend(req: DeviceRequest) -> Result<BackendRef> {
    open_backend_with(req, precision())
}

fn open_backend_with(req: DeviceRequest, p: Precision) -> Result<BackendRef> {
    let (b, line) = backend::select(req, p)?;
    eprintln!("{line}");
    Ok(b)
}

fn load_split(name: &str, dir: Option<&Path>, split: Split, limit: Option<usize>) -> Result<data::Dataset> {
    let ds = data::load(name, split, &data::resolve_data_dir(dir))?;
    Ok(match limit {
        Some(n) => ds.take(n),
        None => ds,
    })
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let (cfg, source, out, existing) = if let Some(dir) = &a.resume {
        // The saved run decides everything but the epoch count; the data is cut to the sizes
        // it was trained on (the check against the record then catches changed files).
        let saved = run::saved_record(&dir.join("model.safetensors"))?;
        let mut cfg = saved.config.clone();
        cfg.epochs = a.epochs;
        let source = DataSource {
            dataset: cfg.dataset.clone(),
            data_dir: a.data.data_dir.clone(),
            train_limit: Some(saved.train_images),
            test_limit: Some(saved.test_images),
        };
        (cfg, source, dir.clone(), run::Existing::Resume)
    } else {
        run::check_model(&a.model)?;
        let mut optim = OptimConfig::new(a.optimizer, a.lr, a.weight_decay);
        optim.momentum = a.momentum;
        let cfg = TrainConfig {
            model: a.model.to_ascii_lowercase(),
            dataset: a.data.dataset.clone(),
            epochs: a.epochs,
            batch_size: a.batch_size,
            optim,
            seed: a.seed,
            augment: a.augment,
        };
        let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", cfg.model, cfg.dataset)));
        let existing = if a.overwrite { run::Existing::Overwrite } else { run::Existing::Refuse };
        (cfg, a.subset.source(&a.data.dataset, a.data.data_dir.as_deref()), out, existing)
    };
    let train_set = source.load(Split::Train)?;
    let test_set = source.load(Split::Test)?;
    let b = open_backend(a.device)?;
    let cfg = TrainConfig { dataset: train_set.name.clone(), ..cfg };
    let mut probe = a.track.probe(a.quiet)?;
    let record = run::train_model(&b, &cfg, &train_set, &test_set, &out, a.quiet, existing, probe.as_mut())?;
    track::draw_variance_track(&out, &format!("{} ({}) on {}", cfg.model, cfg.augment, cfg.dataset), &record)
}

fn cmd_train_pair(a: TrainPairArgs) -> Result<()> {
    run::check_model(&a.model)?;
    let b = open_backend(a.device)?;
    let opts = PairOptions {
        model: a.model.to_ascii_lowercase(),
        data: a.subset.source(&a.data.dataset, a.data.data_dir.as_deref()),
        epochs: (a.epochs, a.rotated_epochs),
        lr: a.lr,
        batch_size: a.batch_size,
        optim: OptimConfig::new(OptimizerKind::Adam, 1e-3, a.weight_decay),
        seed: a.seed,
        overwrite: a.overwrite,
        quiet: a.quiet,
    };
    let dir = a.out.unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}-pair", opts.model, a.data.dataset)));
    let mut probe = a.track.probe(a.quiet)?;
    let m = run::train_pair(&b, &opts, &dir, probe.as_mut())?;
    for member in [&m.unrotated, &m.rotated] {
        let record = run::saved_record(&dir.join(&member.checkpoint))?;
        let title = format!("{} ({}) on {}", m.model, member.config.augment, m.dataset);
        track::draw_variance_track(&dir.join(&member.dir), &title, &record)?;
    }
    println!(
        "pair written to {}: unrotated {:.2}% ({} epochs), rotated {:.2}% ({} epochs), {:.0}s",
        dir.display(),
        100.0 * m.unrotated.final_test_accuracy.unwrap_or(f64::NAN),
        m.unrotated.epochs_trained,
        100.0 * m.rotated.final_test_accuracy.unwrap_or(f64::NAN),
        m.rotated.epochs_trained,
        m.total_seconds
    );
    Ok(())
}

fn cmd_experiment(a: ExperimentArgs) -> Result<()> {
    let model = a.model.clone().unwrap_or_else(|| if a.quick { "lenet" } else { "simpleconv" }.into());
    run::check_model(&model)?;
    let dataset = a.dataset.clone().unwrap_or_else(|| if a.quick { "mnist-sample" } else { "mnist" }.into());
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!("runs/{model}-{dataset}-experiment{}", if a.quick { "-quick" } else { "" }))
    });
    let mut o = if a.quick {
        experiment::ExperimentOptions::quick(out)
    } else {
        let mut o = experiment::ExperimentOptions::quick(out);
        o.epochs = (None, None);
        o.measure_limit = None;
        o
    };
    o.model = model.to_ascii_lowercase();
    o.data = a.subset.source(&dataset, a.data_dir.as_deref());
    o.epochs = (a.epochs.or(o.epochs.0), a.rotated_epochs.or(o.epochs.1));
    o.lr = a.lr;
    o.seed = a.seed;
    o.angles = a.angles.clone();
    o.rotations = a.rotations;
    o.per = a.per;
    o.reduce = a.reduce;
    o.measure_limit = a.measure_limit.or(o.measure_limit);
    o.measure_every = a.measure_every;
    o.transforms = (!a.transform.is_empty()).then(|| TransformSet::parse(&a.transform)).transpose()?;
    o.overwrite = a.overwrite;
    o.quiet = a.quiet;
    angle_eval::parse_angles(&o.angles)?;
    let b = open_backend(a.device)?;
    let report = experiment::run(&b, &o)?;
    println!("report: {}", report.display());
    Ok(())
}

fn cmd_images(a: ImagesArgs) -> Result<()> {
    let angles = angle_eval::parse_angles(&a.angles)?;
    fsio::check_output(&a.out, &[])?;
    let test = load_split(&a.data.dataset, a.data.data_dir.as_deref(), Split::Test, Some(a.count))?;
    let train = load_split(&a.data.dataset, a.data.data_dir.as_deref(), Split::Train, None)?;
    let b = backend::cpu::CpuBackend::shared();
    let data = DeviceDataset::upload(&test, &train.channel_stats(), &b)?;
    figures::rotation_grid(&a.out, &data, a.count, &angles)?;
    println!("wrote {} ({} images x {} angles)", a.out.display(), data.len(), angles.len());
    Ok(())
}

fn cmd_fetch(a: FetchArgs) -> Result<()> {
    let dir = data::resolve_data_dir(a.data_dir.as_deref());
    match a.dataset.as_str() {
        "mnist" => {
            data::fetch::fetch_mnist(&dir)?;
            println!("MNIST is in {} and its checksums match", dir.join("mnist").display());
            Ok(())
        }
        "cifar10" => bail!(
            "rotvar cannot download CIFAR-10; get cifar-10-binary.tar.gz from its authors and extract it so that {} holds data_batch_1.bin ... test_batch.bin",
            dir.join("cifar-10-batches-bin").display()
        ),
        other => bail!("unknown dataset '{other}': rotvar can fetch mnist"),
    }
}
