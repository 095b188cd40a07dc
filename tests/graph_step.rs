//! The training step as one CUDA graph replay (train/feed.rs, backend/cuda/graph.rs), on the
//! kernel emulator: the same bits as plain launches and as the host-valued loop, one replay per
//! step and no other launch, and CUDA's capture rules enforced.

mod common;

use rotvar::backend::cuda::CudaBackend;
use rotvar::backend::{Activation, BackendRef};
use rotvar::models::{InputSpec, Model};
use rotvar::nn::{BatchNorm, Conv2d, Layer, Linear, Sequential};
use rotvar::optim::{OptimConfig, OptimizerKind};
use rotvar::rng::Rng;
use rotvar::train::feed::{self, Feed, Mode};
use rotvar::train::{fit, DeviceDataset, EpochMetrics, Session, TrainConfig};

/// 43 images of 10×10: five full batches of 8 and a partial one of 3.
fn dataset() -> rotvar::data::Dataset {
    common::random_dataset(43, 10, 4)
}

/// Conv, batch norm, ReLU, pooling, dropout, dense: every kind of per-step value the feed
/// carries (indices, augmentation, the dropout seed, Adam's scalars) is used.
fn model(be: &BackendRef) -> Model {
    let mut rng = Rng::new(11);
    let mut net = Sequential::new();
    net.push("conv1", Layer::Conv2d(Conv2d::new(be, &mut rng, 1, 4, 3, 1, 1, true).unwrap()))
        .push("bn1", Layer::BatchNorm(BatchNorm::new(be, 4).unwrap()))
        .push("conv1.act", Layer::Relu)
        .push("pool1", Layer::MaxPool { k: 2, stride: 2, pad: 0 })
        .push("flatten", Layer::Flatten)
        .push("drop", Layer::Dropout(0.25))
        .push("fc", Layer::Linear(Linear::new(be, &mut rng, 100, 10).unwrap()))
        .push("log_softmax", Layer::LogSoftmax);
    Model { arch: "tiny".into(), input: InputSpec { channels: 1, height: 10, width: 10, classes: 10 }, net }
}

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        model: "tiny".into(),
        dataset: "synthetic".into(),
        epochs,
        batch_size: 8,
        optim: OptimConfig::new(OptimizerKind::Adam, 1e-2, 1e-4),
        seed: 3,
        augment: "rotate".parse().unwrap(),
    }
}

struct Run {
    history: Vec<EpochMetrics>,
    weights: Vec<Vec<u32>>,
    replays: u64,
}

/// Tests that force a mode take turns: the mode is the process's.
static MODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn train(mode: Mode) -> Run {
    feed::force_mode(Some(mode));
    let be: BackendRef = CudaBackend::emulated();
    let ds = dataset();
    let data = DeviceDataset::upload(&ds, &ds.channel_stats(), &be).expect("upload");
    let model = model(&be);
    let mut session = Session::new(&model, &config(2)).expect("session");
    let history = fit(&model, &data, Some(&data), &config(2), true, &mut session, |_, _| Ok(())).expect("fit");
    feed::force_mode(None);
    let weights =
        model.net.state().into_iter().map(|(_, t)| t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect()).collect();
    Run { history, weights, replays: be.graph_replays().unwrap() }
}

/// Two epochs of five full batches and a partial one: replayed, fed with plain launches and
/// the host loop reach the same weights and metrics bit for bit. With graphs, the first two
/// full batches run plain, the third is captured and replayed, every later one is a replay:
/// 3 + 5.
#[test]
fn replayed_training_matches_plain_launches_bit_for_bit() {
    let _turn = MODE.lock().unwrap_or_else(|e| e.into_inner());
    let host = train(Mode::Host);
    let plain = train(Mode::Plain);
    let replay = train(Mode::Replay);
    assert_eq!((host.replays, plain.replays, replay.replays), (0, 0, 8));
    for (name, run) in [("plain launches", &plain), ("graph replays", &replay)] {
        assert_eq!(run.weights, host.weights, "{name}: weights differ from the host loop's");
        for (a, b) in run.history.iter().zip(&host.history) {
            assert_eq!(a.train_loss.to_bits(), b.train_loss.to_bits(), "{name}: epoch {} loss", a.epoch);
            assert_eq!(a.train_accuracy, b.train_accuracy, "{name}: epoch {} accuracy", a.epoch);
            assert_eq!(a.test_loss.map(f64::to_bits), b.test_loss.map(f64::to_bits), "{name}: test loss");
        }
    }
    // Training moved the weights (so equality above is not of untouched initial values).
    let be: BackendRef = CudaBackend::emulated();
    let init: Vec<Vec<u32>> = model(&be)
        .net
        .state()
        .into_iter()
        .map(|(_, t)| t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect())
        .collect();
    assert_ne!(init, host.weights);
}

/// Per replayed step the host launches no kernel: one graph replay runs them all.
#[test]
fn a_replayed_step_is_one_graph_launch() {
    let be: BackendRef = CudaBackend::emulated();
    let ds = dataset();
    let data = DeviceDataset::upload(&ds, &ds.channel_stats(), &be).expect("upload");
    let model = model(&be);
    let cfg = config(1);
    let mut session = Session::new(&model, &cfg).expect("session");
    let mut f = Feed::with_mode(&data, &cfg, Mode::Replay).expect("feed").expect("the emulated backend has graphs");
    let order: Vec<u32> = (0..ds.n as u32).rev().collect();
    f.begin_epoch(&order[..f.rows() * 8], &cfg, &mut session.augment_rng, &session.optimizer, |j| j as u64)
        .expect("epoch tables");
    for _ in 0..2 {
        f.step(&model, &data, &mut session.optimizer).expect("warm-up step");
        assert!(!f.replaying());
    }
    f.step(&model, &data, &mut session.optimizer).expect("captured step");
    assert!(f.replaying(), "the third step should have been captured");
    for _ in 0..f.rows() - 3 {
        let (launches, replays) = (be.kernel_launches().unwrap(), be.graph_replays().unwrap());
        f.step(&model, &data, &mut session.optimizer).expect("replayed step");
        assert_eq!(be.kernel_launches().unwrap(), launches, "a replayed step launched kernels itself");
        assert_eq!(be.graph_replays().unwrap(), replays + 1);
    }
    assert_eq!(session.optimizer.steps_taken(), 5);
    let (losses, preds) = f.logs().expect("logs");
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "losses {losses:?}");
    assert!(preds.iter().all(|&p| (0.0..10.0).contains(&p) && p.fract() == 0.0));
}

/// What CUDA stream capture refuses, the emulated capture refuses: host transfers, a buffer
/// the pool does not hold, and a buffer handed out inside that outlives the capture. A
/// temporary read before it is written reads poison on replay.
#[test]
fn capture_follows_cudas_rules() {
    let be: BackendRef = CudaBackend::emulated();
    let x = be.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    let err =
        |r: anyhow::Result<Option<rotvar::backend::Graph>>| format!("{:#}", r.err().expect("capture should fail"));
    assert!(err(be.capture(&mut || be.upload(&[1.0]).map(drop))).contains("cannot be part of a captured graph"));
    assert!(err(be.capture(&mut || be.download(&x).map(drop))).contains("cannot be part of a captured graph"));
    assert!(err(be.capture(&mut || be.alloc(12345).map(drop))).contains("pool does not hold"));
    // Warm the pool with a 4-value buffer, then keep the one taken inside.
    drop(be.alloc(4).unwrap());
    let mut kept = None;
    assert!(err(be.capture(&mut || {
        kept = Some(be.alloc(4)?);
        Ok(())
    }))
    .contains("still alive"));
    drop(kept);

    // A valid capture runs nothing until replayed, then exactly what was recorded.
    let mut y = be.alloc(4).unwrap();
    be.fill(&mut y, 0.0).unwrap();
    let g = be.capture(&mut || be.scale(&x, 2.0, &mut y)).unwrap().expect("a graph");
    assert_eq!(g.kernels, 1);
    assert_eq!(be.download(&y).unwrap(), vec![0.0; 4], "captured work ran during capture");
    be.replay(&g).unwrap();
    assert_eq!(be.download(&y).unwrap(), vec![2.0, 4.0, 6.0, 8.0]);

    // A temporary taken inside is the graph's; read before written, it is poison on replay.
    drop(be.alloc(4).unwrap());
    let g = be
        .capture(&mut || {
            let t = be.alloc(4)?;
            be.add(&x, &t, Activation::Identity, &mut y)
        })
        .unwrap()
        .expect("a graph");
    be.replay(&g).unwrap();
    assert!(be.download(&y).unwrap().iter().all(|v| v.is_nan()), "an unwritten temporary read as a value");
}

/// The rotated evaluation's full passes replay as graphs (train/fed_passes.rs) and give the
/// same figures, bit for bit, as the host loop. 43 images in blocks of 16, 3 points, 5 images
/// per pass: 8 full passes of 15 copies (the first plain, 7 replays) and 2 full random passes
/// of 16 (one plain, one replay); the partial ones run plain.
#[test]
fn replayed_rotated_evaluation_matches_the_host_loop() {
    let _turn = MODE.lock().unwrap_or_else(|e| e.into_inner());
    let ds = dataset();
    let eval = |mode: Mode| {
        feed::force_mode(Some(mode));
        let be: BackendRef = CudaBackend::emulated();
        let data = DeviceDataset::upload(&ds, &ds.channel_stats(), &be).expect("upload");
        let ev =
            rotvar::angle_eval::evaluate_angles(&model(&be), &data, &[0.0, 90.0, 37.0], 16, 5, &ds.class_names, true)
                .expect("evaluate");
        feed::force_mode(None);
        (ev, be.graph_replays().unwrap())
    };
    let (host, host_replays) = eval(Mode::Host);
    let (replay, replays) = eval(Mode::Replay);
    assert_eq!((host_replays, replays), (0, 8));
    assert_eq!(host.per_point.len(), 3);
    for (a, b) in replay.per_point.iter().zip(&host.per_point) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "point {}", b.label);
        assert_eq!(a.accuracy, b.accuracy, "point {}", b.label);
        assert_eq!(a.class_accuracy, b.class_accuracy, "point {}", b.label);
    }
    assert_eq!(replay.group_accuracy, host.group_accuracy);
    assert_eq!(replay.random_loss.to_bits(), host.random_loss.to_bits());
    assert_eq!(replay.random_accuracy, host.random_accuracy);
}

/// The measure's full-batch passes replay as graphs (measure/fed.rs, j fed from the device)
/// and give the same moments, bit for bit, as the host loop, as the fed passes with plain
/// launches, and as the CPU. 43 images in batches of 8 under 3 transformations: 15 fed passes
/// (the first plain, 14 replays), then 3 plain passes of the partial batch of 3.
#[test]
fn replayed_measure_matches_the_host_loop_and_the_cpu() {
    use rotvar::measure::{measure_moments, MeasureConfig, Per};
    use rotvar::transform::TransformSet;
    let _turn = MODE.lock().unwrap_or_else(|e| e.into_inner());
    let ds = dataset();
    for per in [Per::Map, Per::Element] {
        let cfg = MeasureConfig {
            transforms: TransformSet::parse(&["rotate=-90,30,135".into()]).unwrap(),
            fill: vec![-0.3],
            per,
            reduce: rotvar::backend::MapReduce::Max,
            batch: 8,
        };
        let run = |mode: Mode, be: BackendRef| {
            feed::force_mode(Some(mode));
            let data = DeviceDataset::upload(&ds, &ds.channel_stats(), &be).expect("upload");
            let mut calls = 0;
            let got = measure_moments(&model(&be), &data, 0..data.len(), &cfg, &mut |_, _| calls += 1);
            feed::force_mode(None);
            assert_eq!(calls, 18, "{mode:?}: 6 batches × 3 transformations");
            (got.expect("measure"), be.graph_replays())
        };
        let (cpu, _) = run(Mode::Replay, rotvar::backend::cpu::CpuBackend::shared());
        let (host, host_replays) = run(Mode::Host, CudaBackend::emulated());
        let (plain, plain_replays) = run(Mode::Plain, CudaBackend::emulated());
        let (replay, replays) = run(Mode::Replay, CudaBackend::emulated());
        assert_eq!((host_replays, plain_replays, replays), (Some(0), Some(0), Some(14)), "{per:?}");
        let names: Vec<&String> = cpu.iter().map(|l| &l.name).collect();
        assert_eq!(
            names,
            model(&rotvar::backend::cpu::CpuBackend::shared()).intermediate_names().iter().collect::<Vec<_>>(),
            "{per:?}"
        );
        // The fed passes run the host loop's kernels in the host loop's order: the same bits.
        // The CPU agrees to rounding (its exp and log are not the emulator's libm).
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (what, got) in [("host loop", &host), ("fed, plain launches", &plain), ("replayed", &replay)] {
            assert_eq!(got.len(), cpu.len());
            for ((g, h), c) in got.iter().zip(&host).zip(&cpu) {
                let at = format!("{per:?} {what} {}", c.name);
                assert_eq!((&g.name, &g.unit_shape), (&c.name, &c.unit_shape), "{at}");
                assert_eq!(g.moments.class_counts, c.moments.class_counts, "{at}");
                assert!(
                    bits(&g.moments.vx_mean) == bits(&h.moments.vx_mean),
                    "{at}: V_x means differ from the host loop's"
                );
                assert!(bits(&g.moments.vx_m2) == bits(&h.moments.vx_m2), "{at}: V_x M2 differs from the host loop's");
                assert!(bits(&g.moments.vt_sum_std) == bits(&h.moments.vt_sum_std), "{at}: V_t sums differ");
                for (a, b) in [(&g.moments.vx_m2, &c.moments.vx_m2), (&g.moments.vt_sum_std, &c.moments.vt_sum_std)] {
                    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
                    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max);
                    assert!(worst <= 1e-5 * scale, "{at}: {worst:e} from the CPU's (scale {scale:e})");
                }
            }
        }
        assert!(
            cpu.iter().all(|l| l.moments.vt_sum_std.iter().any(|&v| v > 0.0)),
            "{per:?}: the transformations vary the units"
        );
    }
}
