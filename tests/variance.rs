//! The streaming variance measure: backend ops on the CPU and on the emulated CUDA backend
//! against the definition computed on a materialized A (`measure::reference`), the rules for
//! zero denominators, stratification, independence from batch size, the whole pipeline on a
//! small LeNet, the output files, and input errors.

use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::cuda::CudaBackend;
use rotvar::backend::{class_ranks, BackendRef, Interp, MapReduce, VarianceGeom, VarianceMoments, VarianceState};
use rotvar::measure::{self, output, reference::reference, LayerVariance, MeasureConfig, Per, VarianceStats};
use rotvar::models::{InputSpec, Model};
use rotvar::nn::Forward;
use rotvar::ops;
use rotvar::tensor::Tensor;
use rotvar::train::DeviceDataset;
use rotvar::transform::TransformSet;

fn rotations(angles: &[f32]) -> TransformSet {
    TransformSet::rotations(angles)
}

mod common;
use common::Rng;

const REDUCES: [MapReduce; 3] = [MapReduce::Sum, MapReduce::Mean, MapReduce::Max];

fn backends() -> Vec<(&'static str, BackendRef)> {
    let cpu: BackendRef = CpuBackend::shared();
    let emu: BackendRef = CudaBackend::emulated();
    vec![("cpu", cpu), ("cuda-emu", emu)]
}

/// One layer's raw activations for every (sample, rotation): `act[((i·m + j)·units + u)·hw + p]`.
#[derive(Clone)]
struct Case {
    n: usize,
    m: usize,
    units: usize,
    hw: usize,
    classes: usize,
    reduce: MapReduce,
    labels: Vec<u32>,
    act: Vec<f32>,
}

impl Case {
    /// Random sizes (some classes may end up with one sample or none).
    fn random(rng: &mut Rng) -> Case {
        let n = 2 + rng.below(30);
        let m = 1 + rng.below(6);
        let units = 1 + rng.below(20);
        let hw = if rng.below(2) == 0 { 1 } else { 1 + rng.below(12) };
        let classes = 1 + rng.below(4);
        let reduce = REDUCES[rng.below(3)];
        Case::random_with(rng, (n, m, units, hw, classes), reduce)
    }

    fn random_with(
        rng: &mut Rng,
        (n, m, units, hw, classes): (usize, usize, usize, usize, usize),
        reduce: MapReduce,
    ) -> Case {
        let labels = (0..n).map(|_| rng.below(classes) as u32).collect();
        // Units with their own offset and spread, so no two behave alike.
        let params: Vec<(f64, f64)> = (0..units).map(|_| (rng.unit() * 6.0 - 3.0, 0.1 + 2.0 * rng.unit())).collect();
        let mut act = Vec::with_capacity(n * m * units * hw);
        for _ in 0..n * m {
            for &(off, scale) in &params {
                for _ in 0..hw {
                    act.push((off + scale * rng.normal()) as f32);
                }
            }
        }
        Case { n, m, units, hw, classes, reduce, labels, act }
    }

    /// New random activations and labels of the same sizes.
    fn resample(&self, rng: &mut Rng) -> Case {
        Case::random_with(rng, (self.n, self.m, self.units, self.hw, self.classes), self.reduce)
    }

    fn geom(&self, batch: usize) -> VarianceGeom {
        VarianceGeom {
            batch,
            units: self.units,
            hw: self.hw,
            reduce: self.reduce,
            classes: self.classes,
            rotations: self.m,
        }
    }

    /// Activations of samples `start..start + len` at rotation j, [len][units][hw].
    fn batch_act(&self, start: usize, len: usize, j: usize) -> Vec<f32> {
        let per = self.units * self.hw;
        (start..start + len).flat_map(|i| self.act[(i * self.m + j) * per..][..per].iter().copied()).collect()
    }

    /// A[i][j][u] in f64: each unit's hw values reduced straight from the definition.
    fn reduced(&self) -> Vec<f64> {
        self.act
            .chunks(self.hw)
            .map(|x| {
                let xs = x.iter().map(|&v| v as f64);
                match self.reduce {
                    MapReduce::Sum => xs.sum(),
                    MapReduce::Mean => xs.sum::<f64>() / self.hw as f64,
                    MapReduce::Max => xs.fold(f64::NEG_INFINITY, f64::max),
                }
            })
            .collect()
    }

    fn reference(&self) -> LayerVariance {
        reference("layer", &self.reduced(), self.n, self.m, self.units, &self.labels, self.classes).unwrap()
    }

    /// The subset of samples with label k, relabelled as the only class.
    fn class_subset(&self, k: u32) -> Case {
        let per = self.m * self.units * self.hw;
        let rows: Vec<usize> = (0..self.n).filter(|&i| self.labels[i] == k).collect();
        let act = rows.iter().flat_map(|&i| self.act[i * per..(i + 1) * per].iter().copied()).collect();
        Case { n: rows.len(), classes: 1, labels: vec![0; rows.len()], act, ..self.clone() }
    }
}

/// Feed `case` through `be` in batches whose sizes cycle through `chunks` (each at most
/// `batch`), every batch at j = 0..m in order, then read the moments.
fn stream_moments(be: &BackendRef, case: &Case, batch: usize, chunks: &[usize]) -> VarianceMoments {
    let mut st = be.variance_init(&case.geom(batch)).unwrap();
    feed(be, &mut st, case, chunks);
    be.variance_read(&st).unwrap()
}

fn feed(be: &BackendRef, st: &mut VarianceState, case: &Case, chunks: &[usize]) {
    let batch = st.geom().batch;
    let mut seen = vec![0u32; case.classes];
    let (mut start, mut c) = (0, 0);
    while start < case.n {
        let len = chunks[c % chunks.len()].clamp(1, batch).min(case.n - start);
        c += 1;
        let class = &case.labels[start..start + len];
        let rank = class_ranks(&mut seen, class);
        for j in 0..case.m {
            let act = be.upload(&case.batch_act(start, len, j)).unwrap();
            be.variance_update(st, &act, len, class, &rank, j).unwrap();
        }
        start += len;
    }
}

fn stream(be: &BackendRef, case: &Case, batch: usize, chunks: &[usize]) -> LayerVariance {
    let moments = stream_moments(be, case, batch, chunks);
    measure::finalize("layer", &[case.units], &moments).unwrap()
}

/// Equal up to `rel` relative error; NaN only where NaN is expected, infinities exactly.
fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= rel * w.abs()
        };
        assert!(ok, "{what}[{i}]: got {g:e}, want {w:e} (relative error {:e})", ((g - w) / w).abs());
    }
}

fn assert_stats_close(what: &str, got: &VarianceStats, want: &VarianceStats, rel: f64) {
    assert_close(&format!("{what} vt"), &got.vt, &want.vt, rel);
    assert_close(&format!("{what} vx"), &got.vx, &want.vx, rel);
    assert_close(&format!("{what} v"), &got.v, &want.v, rel);
}

fn assert_layers_close(what: &str, got: &LayerVariance, want: &LayerVariance, rel: f64) {
    assert_eq!(got.units(), want.units(), "{what}: units");
    assert_eq!(got.class_counts, want.class_counts, "{what}: class counts");
    assert_stats_close(&format!("{what} all"), &got.all, &want.all, rel);
    assert_close(&format!("{what} stratified"), &got.stratified, &want.stratified, rel);
    for (k, (g, w)) in got.classes.iter().zip(&want.classes).enumerate() {
        assert_stats_close(&format!("{what} class {k}"), g, w, rel);
    }
}

fn assert_bits(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g:e}, want {w:e}");
    }
}

fn assert_moments_bits(what: &str, got: &VarianceMoments, want: &VarianceMoments) {
    assert_eq!(got.class_counts, want.class_counts, "{what}: class counts");
    assert_bits(&format!("{what} vx_mean"), &got.vx_mean, &want.vx_mean);
    assert_bits(&format!("{what} vx_m2"), &got.vx_m2, &want.vx_m2);
    assert_bits(&format!("{what} vt_sum_std"), &got.vt_sum_std, &want.vt_sum_std);
}

#[test]
fn random_activations_match_the_definition_and_cpu_and_cuda_agree_bit_for_bit() {
    let mut rng = Rng(0x7A41);
    let cpu: BackendRef = CpuBackend::shared();
    let emu: BackendRef = CudaBackend::emulated();
    for case_no in 0..12 {
        let case = Case::random(&mut rng);
        let batch = 1 + rng.below(case.n);
        // Ragged batches: later, shorter batches leave stale per-slot moments behind that must
        // not leak into the result.
        let chunks: Vec<usize> = (0..3).map(|_| 1 + rng.below(batch)).collect();
        let tag = format!(
            "case {case_no} (n={} m={} units={} hw={} K={} {:?} batch={batch} chunks={chunks:?})",
            case.n, case.m, case.units, case.hw, case.classes, case.reduce
        );
        let want = case.reference();
        let on_cpu = stream_moments(&cpu, &case, batch, &chunks);
        let on_emu = stream_moments(&emu, &case, batch, &chunks);
        assert_moments_bits(&format!("{tag} cpu vs cuda-emu"), &on_emu, &on_cpu);
        for (name, mom) in [("cpu", &on_cpu), ("cuda-emu", &on_emu)] {
            let got = measure::finalize("layer", &[case.units], mom).unwrap();
            assert_layers_close(&format!("{tag} {name}"), &got, &want, 1e-9);
        }
    }
}

#[test]
fn a_fresh_state_reads_zero_and_an_earlier_run_leaves_no_trace() {
    let mut rng = Rng(0xF2E5);
    for (name, be) in backends() {
        let case = Case::random_with(&mut rng, (17, 3, 6, 4, 3), MapReduce::Mean);
        let first = stream_moments(&be, &case, 5, &[5, 2, 4]);
        // Another run with other data in between, on states of the same geometry.
        let other = case.resample(&mut rng);
        let _ = stream_moments(&be, &other, 5, &[3]);
        let fresh = be.variance_init(&case.geom(5)).unwrap();
        let zero = be.variance_read(&fresh).unwrap();
        assert!(zero.class_counts.iter().all(|&c| c == 0), "{name}: counts {:?}", zero.class_counts);
        for (what, v) in [("vx_mean", &zero.vx_mean), ("vx_m2", &zero.vx_m2), ("vt_sum_std", &zero.vt_sum_std)] {
            assert!(v.iter().all(|&x| x.to_bits() == 0), "{name}: fresh {what} is not all +0.0");
        }
        let again = stream_moments(&be, &case, 5, &[5, 2, 4]);
        assert_moments_bits(&format!("{name}: rerun"), &again, &first);
        assert!(first.vx_m2.iter().any(|&x| x > 0.0), "{name}: the run accumulated nothing");
    }
}

/// Units with known answers: 0 constant, 1 depends on the sample only, 2 on the rotation only,
/// 3 random. Per element (hw = 1) and per map (the same pattern in every position).
fn special_case(hw: usize, reduce: MapReduce) -> Case {
    let (n, m, units, classes) = (9, 5, 4, 3);
    let labels: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
    let mut rng = Rng(0x5EC1A1);
    let mut act = Vec::new();
    for i in 0..n {
        for j in 0..m {
            for u in 0..units {
                for p in 0..hw {
                    let v = match u {
                        0 => 0.75,
                        1 => 0.5 + 0.37 * i as f32 + 0.01 * p as f32,
                        2 => -1.0 + 0.61 * j as f32 + 0.01 * p as f32,
                        _ => rng.normal() as f32,
                    };
                    act.push(v);
                }
            }
        }
    }
    Case { n, m, units, hw, classes, reduce, labels, act }
}

#[test]
fn zero_denominators_follow_the_rules() {
    for (name, be) in backends() {
        for (hw, reduce) in [(1, MapReduce::Sum), (6, MapReduce::Sum), (6, MapReduce::Mean), (6, MapReduce::Max)] {
            let case = special_case(hw, reduce);
            let got = stream(&be, &case, 4, &[4, 3]);
            let tag = format!("{name} hw={hw} {reduce:?}");
            let mut sets: Vec<(String, &VarianceStats)> = vec![("all".into(), &got.all)];
            sets.extend(got.classes.iter().enumerate().map(|(k, c)| (format!("class {k}"), c)));
            for (set, s) in sets {
                // Constant: no variation at all.
                assert_eq!((s.vt[0], s.vx[0], s.v[0]), (0.0, 0.0, 1.0), "{tag} {set}: constant unit");
                // Ignores rotation: V_t is exactly 0 and V is 0.
                assert_eq!(s.vt[1], 0.0, "{tag} {set}: sample-only unit V_t");
                assert!(s.vx[1] > 0.0, "{tag} {set}: sample-only unit V_x");
                assert_eq!(s.v[1], 0.0, "{tag} {set}: sample-only unit V");
                // Driven by rotation only: V_x is exactly 0 and V is +inf.
                assert!(s.vt[2] > 0.0, "{tag} {set}: rotation-only unit V_t");
                assert_eq!(s.vx[2], 0.0, "{tag} {set}: rotation-only unit V_x");
                assert_eq!(s.v[2], f64::INFINITY, "{tag} {set}: rotation-only unit V");
                assert!(s.v[3].is_finite() && s.v[3] > 0.0, "{tag} {set}: random unit V = {}", s.v[3]);
            }
            assert_eq!(&got.stratified[..3], &[1.0, 0.0, f64::INFINITY], "{tag}: stratified");
            assert_layers_close(&tag, &got, &case.reference(), 1e-9);
        }
    }
}

#[test]
fn single_rotation_and_single_samples_give_zero_standard_deviations() {
    // m = 1: no variation over rotations (V_t = 0); a class with one sample: V_x = 0 for it.
    let mut rng = Rng(0x51);
    for (name, be) in backends() {
        let mut case = Case::random_with(&mut rng, (9, 1, 4, 1, 3), MapReduce::Sum);
        case.labels = vec![0, 0, 0, 1, 1, 1, 1, 1, 2];
        let got = stream(&be, &case, 3, &[3]);
        assert!(got.all.vt.iter().all(|&v| v == 0.0), "{name}: V_t with one rotation");
        assert!(got.all.v.iter().all(|&v| v == 0.0), "{name}: V with one rotation");
        assert!(got.classes[2].vx.iter().all(|&v| v == 0.0), "{name}: V_x of a one-sample class");
        assert!(got.classes[2].v.iter().all(|&v| v == 1.0), "{name}: V of a one-sample class, one rotation");
        assert_layers_close(name, &got, &case.reference(), 1e-9);
    }
}

#[test]
fn classes_without_samples_are_skipped_by_stratification() {
    let mut rng = Rng(0xE3);
    for (name, be) in backends() {
        let mut case = Case::random(&mut rng);
        case.classes = 4;
        case.labels = (0..case.n).map(|i| if i % 2 == 0 { 0 } else { 3 }).collect();
        let got = stream(&be, &case, 4, &[4]);
        assert_eq!(got.class_counts[1..3], [0, 0], "{name}");
        assert!(got.classes[1].v.iter().chain(&got.classes[2].vt).all(|v| v.is_nan()), "{name}: empty classes");
        assert!(got.stratified.iter().all(|v| !v.is_nan()), "{name}: stratified must skip empty classes");
        assert_layers_close(name, &got, &case.reference(), 1e-9);
    }
}

#[test]
fn stratified_is_the_mean_of_per_class_runs() {
    let mut rng = Rng(0x57A7);
    for (name, be) in backends() {
        for _ in 0..3 {
            let (n, m, units, hw) = (6 + rng.below(20), 1 + rng.below(5), 1 + rng.below(9), 1 + rng.below(5));
            let reduce = REDUCES[rng.below(3)];
            let case = Case::random_with(&mut rng, (n, m, units, hw, 3), reduce);
            let whole = stream(&be, &case, 4, &[4, 1]);
            let present: Vec<u32> = (0..3).filter(|&k| case.labels.contains(&k)).collect();
            let runs: Vec<LayerVariance> =
                present.iter().map(|&k| stream(&be, &case.class_subset(k), 3, &[3, 2])).collect();
            for (&k, run) in present.iter().zip(&runs) {
                assert_stats_close(&format!("{name} class {k}"), &whole.classes[k as usize], &run.all, 1e-12);
            }
            let mean: Vec<f64> =
                (0..case.units).map(|u| runs.iter().map(|r| r.all.v[u]).sum::<f64>() / runs.len() as f64).collect();
            assert_close(&format!("{name} stratified"), &whole.stratified, &mean, 1e-12);
        }
    }
}

#[test]
fn results_do_not_depend_on_the_batch_size() {
    let mut rng = Rng(0xBA7C);
    for (name, be) in backends() {
        let case = Case::random_with(&mut rng, (23, 4, 7, 3, 3), MapReduce::Sum);
        let all = stream(&be, &case, case.n, &[case.n]);
        for batch in [1, 7] {
            let got = stream(&be, &case, batch, &[batch]);
            assert_layers_close(&format!("{name} batch {batch} vs all"), &got, &all, 1e-12);
        }
    }
}

#[test]
fn bad_updates_are_errors_and_leave_the_state_unchanged() {
    let mut rng = Rng(0xBAD);
    for (name, be) in backends() {
        let mut case = Case::random_with(&mut rng, (6, 3, 5, 2, 2), MapReduce::Max);
        case.labels = vec![0, 1, 1, 0, 1, 0];
        let g = case.geom(4);
        let mut st = be.variance_init(&g).unwrap();
        let act = |start, len, j| be.upload(&case.batch_act(start, len, j)).unwrap();
        let a = act(0, 3, 0);
        let err = |r: anyhow::Result<()>, needle: &str| {
            let e = format!("{:#}", r.expect_err(needle));
            assert!(e.contains(needle), "{name}: error `{e}` should mention `{needle}`");
        };
        err(be.variance_update(&mut st, &a, 3, &[0, 2, 1], &[1, 1, 1], 0), "class[1] = 2");
        err(be.variance_update(&mut st, &a, 3, &[0, 1, 1], &[1, 1, 1], 3), "j = 3");
        err(be.variance_update(&mut st, &a, 3, &[0, 1, 1], &[1, 1, 1], 1), "out of order");
        err(be.variance_update(&mut st, &a, 3, &[0, 1, 1], &[1, 1, 3], 0), "rank[2] = 3");
        err(be.variance_update(&mut st, &a, 3, &[0, 1], &[1, 1], 0), "class labels");
        err(be.variance_update(&mut st, &a, 2, &[0, 1], &[1, 1], 0), "activation has 30 values");
        err(be.variance_update(&mut st, &act(0, 5, 0), 5, &[0; 5], &[1, 2, 3, 4, 5], 0), "n = 5");
        err(be.variance_update(&mut st, &a, 0, &[], &[], 0), "n = 0");
        // A batch half done: the labels must not change, and reading is refused.
        be.variance_update(&mut st, &a, 3, &[0, 1, 1], &[1, 1, 2], 0).unwrap();
        err(be.variance_update(&mut st, &act(0, 3, 1), 3, &[1, 1, 1], &[1, 2, 3], 1), "differ");
        err(be.variance_read(&st).map(|_| ()), "incomplete");
        // A state from the other backend.
        let other: BackendRef = if name == "cpu" { CudaBackend::emulated() } else { CpuBackend::shared() };
        let mut foreign = other.variance_init(&g).unwrap();
        assert!(be.variance_update(&mut foreign, &a, 3, &[0, 1, 1], &[1, 1, 2], 0).is_err(), "{name}: foreign state");
        assert!(be.variance_read(&foreign).is_err(), "{name}: foreign state read");
        // Bad geometries.
        for bad in
            [VarianceGeom { batch: 0, ..g }, VarianceGeom { classes: 0, ..g }, VarianceGeom { rotations: 0, ..g }]
        {
            assert!(be.variance_init(&bad).is_err(), "{name}: {bad:?}");
        }
        // After all that, the rest of the pass gives exactly what a clean pass gives.
        let class = [0u32, 1, 1];
        for j in 1..3 {
            be.variance_update(&mut st, &act(0, 3, j), 3, &class, &[1, 1, 2], j).unwrap();
        }
        for j in 0..3 {
            be.variance_update(&mut st, &act(3, 3, j), 3, &[0, 1, 0], &[2, 3, 3], j).unwrap();
        }
        let got = be.variance_read(&st).unwrap();
        let want = stream_moments(&be, &case, 4, &[3]);
        assert_moments_bits(&format!("{name}: after errors"), &got, &want);
    }
}

// ------------------------------------------------------------------ the pipeline on a model

fn tiny_dataset(be: &BackendRef, n: usize, classes: usize, seed: u64) -> DeviceDataset {
    let mut rng = Rng(seed);
    let images: Vec<f32> = (0..n * 28 * 28).map(|_| rng.normal() as f32).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % classes) as u8).collect();
    let labels_f32: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
    DeviceDataset {
        images: Tensor::from_vec(be, &[n, 1, 28, 28], &images).unwrap(),
        labels: Tensor::from_vec(be, &[n], &labels_f32).unwrap(),
        labels_host: labels,
        item_shape: [1, 28, 28],
        num_classes: classes,
        fill: vec![-0.5],
    }
}

/// A for every intermediate, materialized by running the same forward passes the streaming
/// measure runs (same batches, same rotations), with each unit reduced in f64 by the test.
fn materialize(model: &Model, data: &DeviceDataset, cfg: &MeasureConfig) -> Vec<(String, usize, Vec<f64>)> {
    let (n, m) = (data.len(), cfg.transforms.len());
    let mut layers: Vec<(String, usize, Vec<f64>)> = Vec::new();
    let order: Vec<u32> = (0..n as u32).collect();
    for idx in order.chunks(cfg.batch) {
        let (x, _) = data.batch(idx).unwrap();
        for (j, mat) in cfg.transforms.matrices().into_iter().enumerate() {
            let xr = ops::warp(&x, &vec![mat; idx.len()], Interp::Bilinear, &cfg.fill).unwrap();
            let mut pos = 0;
            let mut observe = |name: &str, t: &Tensor| -> anyhow::Result<()> {
                let s = t.shape().to_vec();
                let hw = if s.len() == 4 && cfg.per == Per::Map { s[2] * s[3] } else { 1 };
                let units = s[1..].iter().product::<usize>() / hw;
                if layers.len() == pos {
                    layers.push((name.to_string(), units, vec![f64::NAN; n * m * units]));
                }
                let a = &mut layers[pos].2;
                for (b, sample) in t.to_vec()?.chunks(units * hw).enumerate() {
                    let i = idx[b] as usize;
                    for (u, x) in sample.chunks(hw).enumerate() {
                        let xs = x.iter().map(|&v| v as f64);
                        a[(i * m + j) * units + u] = match cfg.reduce {
                            MapReduce::Sum => xs.sum(),
                            MapReduce::Mean => xs.sum::<f64>() / hw as f64,
                            MapReduce::Max => xs.fold(f64::NEG_INFINITY, f64::max),
                        };
                    }
                }
                pos += 1;
                Ok(())
            };
            model.forward(&xr, &mut Forward::observe(&mut observe)).unwrap();
        }
    }
    layers
}

#[test]
fn lenet_measure_over_rotation_and_zoom_matches_the_definition_on_materialized_activations() {
    let be: BackendRef = CpuBackend::shared();
    let classes = 3;
    let model = Model::build("lenet", InputSpec { channels: 1, height: 28, width: 28, classes }, &be, 7).unwrap();
    let data = tiny_dataset(&be, 7, classes, 0xE2E);
    let labels: Vec<u32> = data.labels_host.iter().map(|&l| l as u32).collect();
    // Any set of transformations, not only rotations: V over rotation × zoom.
    let rotate_and_zoom = TransformSet::parse(&["rotate=0,90".into(), "zoom=0.7,1.3".into()]).unwrap();
    for (per, reduce) in [(Per::Element, MapReduce::Sum), (Per::Map, MapReduce::Mean), (Per::Map, MapReduce::Max)] {
        let cfg = MeasureConfig { transforms: rotate_and_zoom.clone(), fill: vec![-0.42], per, reduce, batch: 3 };
        let mut calls = Vec::new();
        let got = measure::measure(&model, &data, &cfg, &mut |done, total| calls.push((done, total))).unwrap();
        assert_eq!(calls.last(), Some(&(12, 12)), "progress: 3 batches × 4 rotations");
        let want = materialize(&model, &data, &cfg);
        let names: Vec<&str> = got.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, model.intermediate_names(), "{per:?}: every intermediate, in order");
        for (l, (name, units, a)) in got.iter().zip(&want) {
            assert_eq!(&l.name, name);
            let r = reference(name, a, data.len(), 4, *units, &labels, classes).unwrap();
            assert_layers_close(&format!("{per:?} {reduce:?} {name}"), l, &r, 1e-9);
        }
        let conv1 = &got[0];
        match per {
            Per::Element => assert_eq!((conv1.unit_shape.as_slice(), conv1.map_size), (&[6, 28, 28][..], 1)),
            Per::Map => assert_eq!((conv1.unit_shape.as_slice(), conv1.map_size), (&[6][..], 784)),
        }
        assert_eq!(got.last().unwrap().unit_shape, vec![classes], "log-softmax units");
    }
}

#[test]
fn measure_on_emulated_cuda_matches_the_cpu() {
    // The whole GPU path (gather, rotate, every layer kernel, the variance kernels) on the
    // emulator. Layer kernels round differently from the CPU, so layer means are compared.
    let classes = 2;
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes };
    let cfg = MeasureConfig {
        // Rotation, and translation by whole and fractional pixels.
        transforms: TransformSet::parse(&["rotate=-90,30,135".into(), "translate=0,1.5".into()]).unwrap(),
        fill: vec![-0.42],
        per: Per::Map,
        reduce: MapReduce::Mean,
        batch: 2,
    };
    let mut results = Vec::new();
    for (_, be) in backends() {
        let model = Model::build("lenet", spec, &be, 11).unwrap();
        let data = tiny_dataset(&be, 4, classes, 0xC0DA);
        results.push(measure::measure(&model, &data, &cfg, &mut |_, _| {}).unwrap());
    }
    for (c, e) in results[0].iter().zip(&results[1]) {
        for (what, a, b) in
            [("all", c.mean_v_all(), e.mean_v_all()), ("stratified", c.mean_v_stratified(), e.mean_v_stratified())]
        {
            let (a, b) = (a.unwrap(), b.unwrap());
            assert!((a - b).abs() <= 1e-3 * a.abs(), "{} {what}: cpu {a}, cuda-emu {b}", c.name);
        }
    }
}

#[test]
fn measure_rejects_bad_configurations() {
    let be: BackendRef = CpuBackend::shared();
    let model = Model::build("lenet", InputSpec { channels: 1, height: 28, width: 28, classes: 2 }, &be, 1).unwrap();
    let data = tiny_dataset(&be, 3, 2, 1);
    let good = MeasureConfig {
        transforms: rotations(&[0.0, 90.0]),
        fill: vec![0.0],
        per: Per::Map,
        reduce: MapReduce::Max,
        batch: 2,
    };
    let cases = [
        (MeasureConfig { transforms: rotations(&[]), ..good.clone() }, "at least two"),
        (MeasureConfig { transforms: rotations(&[30.0]), ..good.clone() }, "at least two"),
        (MeasureConfig { transforms: rotations(&[f32::NAN, 0.0]), ..good.clone() }, "not finite"),
        (MeasureConfig { fill: vec![0.0, 0.0], ..good.clone() }, "fill"),
        (MeasureConfig { batch: 0, ..good.clone() }, "batch size"),
    ];
    for (cfg, needle) in cases {
        let e = format!("{:#}", measure::measure(&model, &data, &cfg, &mut |_, _| {}).unwrap_err());
        assert!(e.contains(needle), "error `{e}` should mention `{needle}`");
    }
    let mut bad_labels = tiny_dataset(&be, 3, 2, 1);
    bad_labels.labels_host[1] = 5;
    let e = format!("{:#}", measure::measure(&model, &bad_labels, &good, &mut |_, _| {}).unwrap_err());
    assert!(e.contains("label 5"), "{e}");
    assert!(measure::measure(&model, &data, &good, &mut |_, _| {}).is_ok());
}

#[test]
fn evenly_spaced_angles_start_at_minus_180() {
    let a = measure::rotation_angles(16);
    assert_eq!(a.len(), 16);
    for (j, &x) in a.iter().enumerate() {
        assert_eq!(x, -180.0 + 22.5 * j as f32, "angle {j}");
    }
    assert_eq!(measure::rotation_angles(4), vec![-180.0, -90.0, 0.0, 90.0]);
}

#[test]
fn results_are_written_and_read_back() {
    let be: BackendRef = CpuBackend::shared();
    let case = special_case(1, MapReduce::Sum);
    let mut l = stream(&be, &case, 4, &[4]);
    l.name = "conv1".into();
    let mut l2 = stream(&be, &case.resample(&mut Rng(3)), 4, &[4]);
    l2.name = "fc1.act".into();
    let layers = vec![l, l2];
    let cfg = MeasureConfig {
        transforms: rotations(&measure::rotation_angles(5)),
        fill: vec![0.0],
        per: Per::Element,
        reduce: MapReduce::Sum,
        batch: 4,
    };
    let summary = output::summarize(&layers, Some(&cfg));
    assert_eq!(summary.layers[0].non_finite_v_all, 1, "the rotation-only unit");
    let finite: Vec<f64> = layers[0].all.v.iter().copied().filter(|v| v.is_finite()).collect();
    assert_eq!(summary.layers[0].mean_v_all, Some(finite.iter().sum::<f64>() / finite.len() as f64));
    let means = [summary.layers[0].mean_v_all.unwrap(), summary.layers[1].mean_v_all.unwrap()];
    assert_eq!(summary.global_mean_v_all, Some((means[0] + means[1]) / 2.0), "mean of layer means");

    let dir = tempfile::tempdir().unwrap();
    let (tp, sp) = (dir.path().join("v.safetensors"), dir.path().join("v.json"));
    output::write(&tp, &sp, &layers, &summary).unwrap();
    let text = std::fs::read_to_string(&sp).unwrap();
    assert_eq!(text, serde_json::to_string_pretty(&summary).unwrap() + "\n");
    // serde_json's default parser may round the 17th digit, so parsed numbers are compared loosely.
    let back: output::Summary = serde_json::from_str(&text).unwrap();
    assert_eq!((back.samples, &back.class_counts, back.rotations), (9, &vec![3, 3, 3], 5));
    assert_eq!(back.layers.iter().map(|l| &l.name).collect::<Vec<_>>(), ["conv1", "fc1.act"]);
    let (a, b) = (back.global_mean_v_stratified.unwrap(), summary.global_mean_v_stratified.unwrap());
    assert!((a - b).abs() <= 1e-15 * b.abs(), "{a} vs {b}");
    let bytes = std::fs::read(&tp).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let read = |name: &str| -> Vec<f64> {
        let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F64, "{name}");
        t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
    };
    assert_bits("conv1/all/v", &read("conv1/all/v"), &layers[0].all.v);
    assert_bits("conv1/stratified/v", &read("conv1/stratified/v"), &layers[0].stratified);
    assert_bits("fc1.act/class2/vx", &read("fc1.act/class2/vx"), &layers[1].classes[2].vx);
    let counts = st.tensor("conv1/class_counts").unwrap();
    assert_eq!(counts.dtype(), safetensors::Dtype::I64);
    assert_eq!(counts.shape(), &[3]);
    assert_eq!(st.names().len(), 2 * (4 + 3 * 3 + 1));

    let table = output::table(&summary);
    assert!(table.contains("conv1") && table.contains("fc1.act") && table.contains("global"), "{table}");
}

/// Fed updates (j read from a device counter, as the measure's replayed passes use them) give
/// the plain updates' bits on both backends, and the fed protocol is enforced: no update
/// without a begun batch, no plain update or read while one is open, no second begin.
#[test]
fn fed_updates_match_plain_ones_and_keep_the_protocol() {
    let mut rng = Rng(71);
    for _ in 0..4 {
        let case = Case::random(&mut rng);
        let batch = 1 + rng.below(case.n);
        for (name, be) in backends() {
            let want = stream_moments(&be, &case, batch, &[batch]);
            let mut st = be.variance_init(&case.geom(batch)).unwrap();
            let counter = be.upload(&[0.0]).unwrap();
            assert!(be.variance_end_fed(&mut st).is_err(), "{name}: end before begin");
            let mut seen = vec![0u32; case.classes];
            assert!(be.variance_update_fed(&mut st, &counter, &counter).is_err(), "{name}: update before begin");
            for start in (0..case.n).step_by(batch) {
                let len = batch.min(case.n - start);
                let class = &case.labels[start..start + len];
                let rank = class_ranks(&mut seen, class);
                be.variance_begin_fed(&mut st, class, &rank).unwrap();
                assert!(be.variance_begin_fed(&mut st, class, &rank).is_err(), "{name}: a second begin");
                assert!(be.variance_read(&st).is_err(), "{name}: a read in a fed batch");
                for j in 0..case.m {
                    let act = be.upload(&case.batch_act(start, len, j)).unwrap();
                    if j == 0 {
                        let plain = be.variance_update(&mut st, &act, len, class, &rank, 0);
                        assert!(plain.is_err(), "{name}: a plain update in a fed batch");
                    }
                    let c = be.upload(&[f32::from_bits(j as u32)]).unwrap();
                    be.variance_update_fed(&mut st, &act, &c).unwrap();
                }
                be.variance_end_fed(&mut st).unwrap();
            }
            let got = be.variance_read(&st).unwrap();
            assert_moments_bits(&format!("{name}: fed"), &got, &want);
        }
    }
}
