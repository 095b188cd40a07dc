//! rotvar's own CPU GEMM: every instruction-set path against the portable oracle (to the bit),
//! the oracle against an f64 product, and a whole training run on each path (to the bit).

mod common;

use common::training::adam_steps_bits;
use rotvar::backend::cpu::gemm::{crate_sgemm, sgemm_with, Mat};
use rotvar::backend::cpu::isa::{self, Isa};
use rotvar::rng::Rng;

/// One random problem: shapes, layouts and whether to accumulate.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
    c_t: bool,
    accumulate: bool,
}

fn layout(rows: usize, cols: usize, transposed: bool) -> Mat {
    if transposed {
        Mat::transposed(rows)
    } else {
        Mat::rows(cols)
    }
}

/// Shapes that cover full tiles, edge tiles in both directions, several reduction blocks
/// (KC = 128), fewer columns than a vector (the transposed route), every layout, and A read in
/// place (row-major) with a short last strip, or packed because its rows lie 4 KiB apart.
fn cases(rng: &mut Rng) -> Vec<Case> {
    let mut out = Vec::new();
    for &(m, n, k) in &[
        (1, 1, 1),
        (8, 48, 128),
        (32, 784, 9),
        (32, 9, 784),
        (6, 196, 150),
        (120, 392, 400),
        (13, 50, 257),
        (64, 576, 196),
        (11, 20, 1024),
        // LeNet's fc1 outputs: a whole strip, two vectors, then a partial one.
        (16, 84, 300),
    ] {
        out.push(Case { m, n, k, a_t: false, b_t: false, c_t: false, accumulate: false });
    }
    for _ in 0..24 {
        out.push(Case {
            m: 1 + rng.below(70) as usize,
            n: 1 + rng.below(130) as usize,
            k: 1 + rng.below(300) as usize,
            a_t: rng.below(2) == 1,
            b_t: rng.below(2) == 1,
            c_t: rng.below(2) == 1,
            accumulate: rng.below(2) == 1,
        });
    }
    out
}

/// Run `case` on `isa` (None: the crate) over fresh random data; the output starts as NaN unless
/// the case accumulates, then as the given `c0`.
fn run(isa: Option<Isa>, case: &Case, a: &[f32], b: &[f32], c0: &[f32]) -> Vec<f32> {
    let Case { m, n, k, .. } = *case;
    let (la, lb, lc) = (layout(m, k, case.a_t), layout(k, n, case.b_t), layout(m, n, case.c_t));
    let mut c = if case.accumulate { c0.to_vec() } else { vec![f32::NAN; m * n] };
    match isa {
        Some(i) => sgemm_with(i, m, n, k, a, la, b, lb, &mut c, lc, case.accumulate),
        None => crate_sgemm(m, n, k, a, la, b, lb, &mut c, lc, case.accumulate),
    }
    c
}

/// c0 + a·b in f64, element (i, j) at its place in `lc`.
fn reference(case: &Case, a: &[f32], b: &[f32], c0: &[f32]) -> Vec<f64> {
    let Case { m, n, k, .. } = *case;
    let (la, lb, lc) = (layout(m, k, case.a_t), layout(k, n, case.b_t), layout(m, n, case.c_t));
    let at = |l: Mat, r: usize, c: usize| (r as isize * l.rs + c as isize * l.cs) as usize;
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = if case.accumulate { c0[at(lc, i, j)] as f64 } else { 0.0 };
            for p in 0..k {
                s += a[at(la, i, p)] as f64 * b[at(lb, p, j)] as f64;
            }
            out[at(lc, i, j)] = s;
        }
    }
    out
}

#[test]
fn every_path_matches_the_portable_oracle_to_the_bit() {
    let mut rng = Rng::new(41);
    let paths: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.supported()).collect();
    println!("paths this CPU runs: {paths:?} ({})", isa::cpu_model());
    for case in cases(&mut rng) {
        let (a, b, c0): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            (0..case.m * case.k).map(|_| rng.normal()).collect(),
            (0..case.k * case.n).map(|_| rng.normal()).collect(),
            (0..case.m * case.n).map(|_| rng.normal()).collect(),
        );
        let oracle = run(Some(Isa::Portable), &case, &a, &b, &c0);
        let want = reference(&case, &a, &b, &c0);
        for (i, (got, want)) in oracle.iter().zip(&want).enumerate() {
            let scale = 1.0 + (case.k as f64).sqrt();
            assert!(
                (*got as f64 - want).abs() <= 1e-5 * scale * (1.0 + want.abs()),
                "portable {}x{}x{} at {i}: {got} vs f64 {want}",
                case.m,
                case.n,
                case.k
            );
        }
        for &isa in &paths {
            let got = run(Some(isa), &case, &a, &b, &c0);
            let same = got.iter().zip(&oracle).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{isa} differs from portable at {}x{}x{}", case.m, case.n, case.k);
        }
        // The crate sums in another order: close, not equal.
        let baseline = run(None, &case, &a, &b, &c0);
        for (x, y) in baseline.iter().zip(&oracle) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()) * (case.k as f32).sqrt(), "crate {x} vs rotvar {y}");
        }
    }
}

#[test]
fn nan_and_infinity_propagate_alike_on_every_path() {
    let (m, n, k) = (9, 40, 20);
    let mut rng = Rng::new(3);
    let mut a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
    a[5] = f32::NAN;
    a[3 * k + 2] = f32::INFINITY;
    let case = Case { m, n, k, a_t: false, b_t: false, c_t: false, accumulate: false };
    let oracle = run(Some(Isa::Portable), &case, &a, &b, &[]);
    assert!(oracle[..n].iter().all(|v| v.is_nan()), "a NaN in row 0 of a must poison row 0 of c");
    assert!(oracle[n..2 * n].iter().all(|v| v.is_finite()));
    for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
        let got = run(Some(isa), &case, &a, &b, &[]);
        assert!(got.iter().zip(&oracle).all(|(x, y)| x.to_bits() == y.to_bits()), "{isa}");
    }
}

/// Bits of every state tensor after three Adam steps of `arch` on fixed random data.
fn train_bits(arch: &str, threads: usize) -> Vec<(String, Vec<u32>)> {
    adam_steps_bits(arch, threads, 5, 11)
}

/// The only test of this binary that changes the process-wide choice of path.
#[test]
fn training_gives_the_same_bits_on_every_path_and_thread_count() {
    let paths: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.supported()).collect();
    for (arch, paths) in [("lenet", &paths[..]), ("simpleconv", &paths[paths.len().saturating_sub(2)..])] {
        let mut runs = Vec::new();
        for (t, &isa) in paths.iter().enumerate() {
            isa::choose(Some(isa)).unwrap();
            runs.push((isa, 1 + t % 2, train_bits(arch, 1 + t % 2)));
        }
        isa::choose(None).unwrap();
        let crate_bits = train_bits(arch, 2);
        let (first_isa, first_threads, first) = &runs[0];
        for (isa, threads, bits) in &runs[1..] {
            assert!(
                bits == first,
                "{arch}: {isa} on {threads} threads differs from {first_isa} on {first_threads} threads"
            );
        }
        // A control: the comparison can tell two engines apart.
        assert!(
            crate_bits != *first,
            "{arch}: the crate and rotvar's GEMM gave identical bits; the test cannot see a difference"
        );
    }
}

/// Operands laid out once (`PackedLhs`, or written element by element through `LhsLayout` and
/// `RhsLayout`, or B row-major read in place, as Winograd does) give the same bits as the GEMM that packs them itself: on
/// every path, across several reduction blocks and row blocks, with and without accumulation.
#[test]
fn prepacked_operands_give_the_same_bits() {
    use rotvar::backend::cpu::gemm::{sgemm_prepacked, LhsLayout, PackedLhs, RhsLayout, RhsOperand};
    let mut rng = Rng::new(41);
    for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
        for &(m, n, k, accumulate) in
            &[(32, 48, 32, false), (24, 112, 64, true), (130, 50, 300, false), (7, 16, 129, true), (64, 784, 9, false)]
        {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
            let mut want = if accumulate { c0.clone() } else { vec![f32::NAN; m * n] };
            sgemm_with(isa, m, n, k, &a, Mat::rows(k), &b, Mat::rows(n), &mut want, Mat::rows(n), accumulate);

            let packed = PackedLhs::new(isa, m, k, &a, Mat::rows(k));
            let la = LhsLayout::new(isa, m, k);
            let mut a_laid = vec![f32::NAN; la.len()];
            let lb = RhsLayout::new(isa, k, n);
            let mut b_laid = vec![f32::NAN; lb.len()];
            for r in 0..m {
                for p in 0..k {
                    a_laid[la.offset(r, p)] = a[r * k + p];
                    assert_eq!(
                        packed.data[la.offset(r, p)].to_bits(),
                        a[r * k + p].to_bits(),
                        "{isa} {m}×{k}: ({r}, {p})"
                    );
                }
            }
            for p in 0..k {
                for j in 0..n {
                    b_laid[lb.offset(p, j)] = b[p * n + j];
                }
            }
            // B row-major, read in place, its rows padded past n with NaN; the slice ends at the
            // last row's last value (no whole vector may be read past it).
            let ld = n + 3;
            let mut b_rows = vec![f32::NAN; k * ld];
            for p in 0..k {
                b_rows[p * ld..p * ld + n].copy_from_slice(&b[p * n..(p + 1) * n]);
            }
            let b_rows = &b_rows[..(k - 1) * ld + n];
            // Padding the layouts leave unwritten must not reach the output: it stays NaN here.
            for (what, a_op) in [("PackedLhs", &packed.data), ("LhsLayout", &a_laid)] {
                for (b_what, b_op) in
                    [("packed", RhsOperand::Packed(&b_laid, lb)), ("rows", RhsOperand::Rows(b_rows, ld))]
                {
                    let mut got = if accumulate { c0.clone() } else { vec![f32::NAN; m * n] };
                    sgemm_prepacked(isa, m, n, a_op, la, b_op, &mut got, Mat::rows(n), accumulate);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{isa} {what} B {b_what} {m}×{n}×{k}");
                }
            }
        }
    }
}

/// A right-hand operand packed once (`PackedRhs`, as the dense layers pack their weight) gives
/// the same bits as the GEMM that packs it per call: on every path, with A read in place or
/// packed, B plain or transposed, short last strips, several reduction blocks, accumulating or not.
#[test]
fn a_packed_right_hand_operand_gives_the_same_bits() {
    use rotvar::backend::cpu::gemm::{sgemm_packed_rhs, PackedRhs, RhsOperand};
    let mut rng = Rng::new(43);
    for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
        for &(m, n, k, a_t, b_t, accumulate) in &[
            (64, 84, 700, false, true, false),
            (13, 100, 130, false, false, true),
            (9, 5, 40, true, false, false),
            (40, 200, 84, false, false, false),
            (17, 48, 256, true, true, true),
            (8, 33, 1024, false, true, false),
            (5, 7, 0, false, true, false),
            (5, 0, 9, false, false, false),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
            let (la, lb) = (layout(m, k, a_t), layout(k, n, b_t));
            let mut want = if accumulate { c0.clone() } else { vec![f32::NAN; m * n] };
            sgemm_with(isa, m, n, k, &a, la, &b, lb, &mut want, Mat::rows(n), accumulate);
            let packed = PackedRhs::new(isa, k, n, &b, lb);
            let mut got = if accumulate { c0.clone() } else { vec![f32::NAN; m * n] };
            sgemm_packed_rhs(isa, m, k, &a, la, packed.operand(), n, &mut got, Mat::rows(n), accumulate);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{isa} {m}×{n}×{k} a_t={a_t} b_t={b_t}");
            // The same with B row-major and read in place (rows padded with NaN past n).
            let ld = n + 1;
            let mut b_rows = vec![f32::NAN; k * ld];
            for p in 0..k {
                for j in 0..n {
                    b_rows[p * ld + j] = b[(p as isize * lb.rs + j as isize * lb.cs) as usize];
                }
            }
            let mut got = if accumulate { c0.clone() } else { vec![f32::NAN; m * n] };
            sgemm_packed_rhs(isa, m, k, &a, la, RhsOperand::Rows(&b_rows, ld), n, &mut got, Mat::rows(n), accumulate);
            assert_eq!(bits(&got), bits(&want), "{isa} rows {m}×{n}×{k} a_t={a_t} b_t={b_t}");
        }
    }
}
