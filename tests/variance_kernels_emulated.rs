//! Parity of kernels/variance.cu, run on the host emulator, with its CPU twin (the arithmetic of
//! `rotvar::backend::variance`): bit for bit, since the kernels use only explicitly rounded
//! double operations. Outputs are poisoned with NaN before each launch (per-slot V_t moments
//! too, at j = 0, where the kernel must overwrite them), and each kernel runs under its
//! documented launch and under small grids and odd blocks that force grid-stride iterations.

use rotvar::backend::cuda::emu::{self, KArg};
use rotvar::backend::variance::{reduce_unit, std_from_m2, welford_step};
use rotvar::backend::MapReduce;

mod common;
use common::Rng;

fn run(name: &str, grid: u32, block: u32, args: &[KArg]) {
    // SAFETY: every test passes pointers to live Vecs sized for the launch.
    unsafe { emu::launch(name, (grid, 1, 1), (block, 1, 1), 0, args) }.unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn assert_bits(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g:e}, want {w:e}");
    }
}

/// The documented launch (block 256, grid min(ceil(n/1024), 4·132)) and two that stride.
fn cfgs(n: usize) -> [(u32, u32); 3] {
    [(n.div_ceil(1024).clamp(1, 528) as u32, 256), (2, 64), (1, 33)]
}

#[test]
fn reduce_matches_the_cpu_twin() {
    let mut rng = Rng(0x4ED);
    for (rows, hw) in [(1, 1), (37, 1), (700, 3), (5, 784), (130, 49)] {
        // Many ties, zeros of both signs (where max's first-wins rule decides the sign bit),
        // a few infinities and huge values.
        let mut act: Vec<f32> = (0..rows * hw)
            .map(|_| match rng.below(10) {
                0 => 0.0,
                1 => -0.0,
                2..=6 => (rng.below(9) as f32 - 4.0) * 0.37,
                _ => rng.f32(-2.0, 2.0),
            })
            .collect();
        for _ in 0..rows * hw / 50 {
            let i = rng.below(act.len());
            act[i] = if rng.below(2) == 0 { f32::INFINITY } else { -1e30 };
        }
        for reduce in [MapReduce::Sum, MapReduce::Mean, MapReduce::Max] {
            let want: Vec<f64> = act.chunks(hw).map(|x| reduce_unit(x, reduce)).collect();
            for (grid, block) in cfgs(rows) {
                let mut vals = vec![f64::NAN; rows];
                let mode = match reduce {
                    MapReduce::Sum => 0,
                    MapReduce::Mean => 1,
                    MapReduce::Max => 2,
                };
                run(
                    "variance_reduce_f64",
                    grid,
                    block,
                    &[
                        KArg::slice_mut(&mut vals),
                        KArg::slice(&act),
                        KArg::I64(rows as i64),
                        KArg::I32(hw as i32),
                        KArg::I32(mode),
                    ],
                );
                assert_bits(&format!("reduce {reduce:?} rows={rows} hw={hw} grid={grid} block={block}"), &vals, &want);
            }
        }
    }
}

/// Accumulators in the kernel's class-major layout.
#[derive(Clone)]
struct State {
    vx_mean: Vec<f64>,
    vx_m2: Vec<f64>,
    vt_mean: Vec<f64>,
    vt_m2: Vec<f64>,
    sum_std: Vec<f64>,
}

/// The CPU twin of variance_update_f64, written from its documented contract.
#[allow(clippy::too_many_arguments)]
fn update_twin(s: &mut State, vals: &[f64], class: &[u32], rank: &[u32], units: usize, m: usize, j: usize) {
    for u in 0..units {
        for b in 0..class.len() {
            let v = vals[b * units + u];
            let k = class[b] as usize;
            let xi = (k * m + j) * units + u;
            welford_step(&mut s.vx_mean[xi], &mut s.vx_m2[xi], v, rank[b] as f64);
            let ti = b * units + u;
            if j == 0 {
                s.vt_mean[ti] = v;
                s.vt_m2[ti] = 0.0;
            } else {
                welford_step(&mut s.vt_mean[ti], &mut s.vt_m2[ti], v, (j + 1) as f64);
            }
            if j + 1 == m {
                s.sum_std[k * units + u] += std_from_m2(s.vt_m2[ti], m as f64);
            }
        }
    }
}

/// variance_update_f64_v2's label table, from its documented layout: class | rank | start |
/// order, order listing each class's samples in increasing index.
fn labels_table(class: &[u32], rank: &[u32], classes: usize) -> Vec<u32> {
    let mut start = vec![0u32];
    let mut order = Vec::new();
    for k in 0..classes as u32 {
        order.extend((0..class.len() as u32).filter(|&b| class[b as usize] == k));
        start.push(order.len() as u32);
    }
    [class, rank, &start, &order].concat()
}

/// Both variants of the update (v1: a thread per unit; v2: a thread per unit and class) against
/// the twin, bit for bit.
#[test]
fn update_matches_the_cpu_twin() {
    let mut rng = Rng(0x0DA7E);
    // (n, units, classes, rotations): a single unit, units spanning several blocks, m = 1.
    // (3, 40, 6, 2) leaves at least three classes without a sample in the batch.
    for (n, units, classes, m) in
        [(1, 1, 1, 1), (9, 5, 3, 4), (17, 300, 2, 3), (4, 1500, 4, 2), (6, 7, 2, 1), (3, 40, 6, 2), (40, 3, 10, 3)]
    {
        // A state in the middle of a pass: moments from earlier batches, counts so far.
        let mut counts: Vec<u32> = (0..classes).map(|_| rng.below(5) as u32).collect();
        let class: Vec<u32> = (0..n).map(|_| rng.below(classes) as u32).collect();
        let rank: Vec<u32> = class
            .iter()
            .map(|&k| {
                counts[k as usize] += 1;
                counts[k as usize]
            })
            .collect();
        let class_rank: Vec<u32> = class.iter().chain(&rank).copied().collect();
        let labels = labels_table(&class, &rank, classes);
        let vals: Vec<f64> = (0..n * units).map(|_| rng.normal() * 3.0 + 1.0).collect();
        let start = State {
            vx_mean: (0..classes * m * units).map(|_| rng.normal()).collect(),
            vx_m2: (0..classes * m * units).map(|_| rng.unit() * 5.0).collect(),
            vt_mean: vec![f64::NAN; n * units],
            vt_m2: vec![f64::NAN; n * units],
            sum_std: (0..classes * units).map(|_| rng.unit() * 10.0).collect(),
        };
        for j in 0..m {
            let mut want = start.clone();
            if j > 0 {
                // Later rotations continue the per-slot moments of the earlier ones.
                want.vt_mean = (0..n * units).map(|_| rng.normal()).collect();
                want.vt_m2 = (0..n * units).map(|_| rng.unit() * 2.0).collect();
            }
            let before = want.clone();
            update_twin(&mut want, &vals, &class, &rank, units, m, j);
            let launches = cfgs(units).map(|c| ("variance_update_f64", c)).into_iter();
            for (kernel, (grid, block)) in launches.chain(cfgs(units * classes).map(|c| ("variance_update_f64_v2", c)))
            {
                let mut got = before.clone();
                let v2 = kernel.ends_with("v2");
                let mut args = vec![
                    KArg::slice_mut(&mut got.vx_mean),
                    KArg::slice_mut(&mut got.vx_m2),
                    KArg::slice_mut(&mut got.vt_mean),
                    KArg::slice_mut(&mut got.vt_m2),
                    KArg::slice_mut(&mut got.sum_std),
                    KArg::slice(&vals),
                    KArg::slice(if v2 { &labels } else { &class_rank }),
                    KArg::I32(n as i32),
                    KArg::I32(units as i32),
                ];
                if v2 {
                    args.push(KArg::I32(classes as i32));
                }
                args.extend([KArg::I32(m as i32), KArg::I32(j as i32)]);
                run(kernel, grid, block, &args);
                let tag = format!("{kernel} n={n} units={units} K={classes} m={m} j={j} grid={grid} block={block}");
                assert_bits(&format!("{tag} vx_mean"), &got.vx_mean, &want.vx_mean);
                assert_bits(&format!("{tag} vx_m2"), &got.vx_m2, &want.vx_m2);
                assert_bits(&format!("{tag} vt_mean"), &got.vt_mean, &want.vt_mean);
                assert_bits(&format!("{tag} vt_m2"), &got.vt_m2, &want.vt_m2);
                assert_bits(&format!("{tag} sum_std"), &got.sum_std, &want.sum_std);
                assert!(got.vt_mean.iter().all(|v| !v.is_nan()), "{tag}: a poisoned slot was left");
            }
        }
    }
}
