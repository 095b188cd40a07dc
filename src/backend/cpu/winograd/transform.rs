//! The Winograd transforms: the Toom-Cook matrices of F(2,3), F(4,3), F(2,5) and F(4,5), as
//! compile-time constants, and the sandwich `l·x·rᵀ` that applies them to a tile.

use std::mem::MaybeUninit;

/// The three transforms of F(m×m, r×r), α = m + r − 1. The matrices are the Toom-Cook ones for
/// the interpolation points 0, ±1, ±2 (and ±1/2 for α = 8) and ∞, each folded (see `Folded`).
pub(super) struct Transform<const M: usize, const A: usize, const R: usize> {
    /// Output: y = Aᵀ·M·A.
    pub(super) at: Folded<M, A>,
    /// Output gradient, for the weight gradient: A·dy·Aᵀ.
    pub(super) a: Folded<A, M>,
    /// Filter: U = G·w·Gᵀ.
    pub(super) g: Folded<A, R>,
    /// Filter gradient: dw = Gᵀ·dU·G.
    pub(super) gt: Folded<R, A>,
    /// Input: V = Bᵀ·d·B.
    pub(super) bt: Folded<A, A>,
    /// Its adjoint, for backward-data through the transformed domain: dx += B·dV·Bᵀ.
    pub(super) b: Folded<A, A>,
}

/// A transform matrix with its ±p symmetry made explicit. A point p and its mirror −p give the
/// matrices pairs of rows (Bᵀ, G and A: row(−p)[k] = (−1)^k·row(p)[k]) or pairs of columns (Aᵀ and
/// Gᵀ: col(−p)[i] = (−1)^i·col(p)[i]). A row pair is then E ± O, E and O the sums of row(p)'s even
/// and odd terms; a column pair first turns x_j, x_j+1 into their sum and difference, and every
/// row needs only one of the two. That halves the terms of every paired row or column, which is
/// most of them: F(4×4, 5×5)'s input transform goes from 44 terms a column to 26 and 6 sums.
pub(super) struct Folded<const R: usize, const K: usize> {
    /// The coefficients; a column pair's are rewritten: column j applies to x_j + x_j+1 (even
    /// rows only), column j+1 to x_j − x_j+1 (odd rows only).
    l: [[f32; K]; R],
    /// Row i and row i+1 are a pair (row i+1 is then computed from row i's coefficients).
    rows: [bool; R],
    /// Columns j and j+1 are a pair.
    cols: [bool; K],
}

/// −1 for odd indices.
const fn parity(i: usize) -> f32 {
    if i.is_multiple_of(2) {
        1.0
    } else {
        -1.0
    }
}

/// Finds the pairs of `l`: column pairs if it has any, else row pairs (no Toom-Cook matrix has
/// both).
const fn fold<const R: usize, const K: usize>(l: [[f32; K]; R]) -> Folded<R, K> {
    let mut out = Folded { l, rows: [false; R], cols: [false; K] };
    let (mut j, mut any) = (0, false);
    while j + 1 < K {
        let (mut pair, mut used, mut i) = (true, false, 0);
        while i < R {
            pair &= l[i][j + 1] == parity(i) * l[i][j];
            used |= l[i][j] != 0.0;
            i += 1;
        }
        if pair && used {
            out.cols[j] = true;
            any = true;
            let mut i = 0;
            while i < R {
                let (c, even) = (l[i][j], i % 2 == 0);
                out.l[i][j] = if even { c } else { 0.0 };
                out.l[i][j + 1] = if even { 0.0 } else { c };
                i += 1;
            }
            j += 1;
        }
        j += 1;
    }
    let mut i = 0;
    while !any && i + 1 < R {
        let (mut pair, mut k) = (true, 0);
        while k < K {
            pair &= l[i + 1][k] == parity(k) * l[i][k];
            k += 1;
        }
        if pair {
            out.rows[i] = true;
            i += 1;
        }
        i += 1;
    }
    out
}

const fn transpose<const R: usize, const C: usize>(m: [[f32; C]; R]) -> [[f32; R]; C] {
    let mut t = [[0.0; R]; C];
    let mut r = 0;
    while r < R {
        let mut c = 0;
        while c < C {
            t[c][r] = m[r][c];
            c += 1;
        }
        r += 1;
    }
    t
}

const F2_AT: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];
const F2_G: [[f32; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
const F2_BT: [[f32; 4]; 4] =
    [[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]];
const F2: Transform<2, 4, 3> = Transform {
    at: fold(F2_AT),
    a: fold(transpose(F2_AT)),
    g: fold(F2_G),
    gt: fold(transpose(F2_G)),
    bt: fold(F2_BT),
    b: fold(transpose(F2_BT)),
};

// α = 6: points 0, ±1, ±2 and ∞. F(4,3) and F(2,5) share Bᵀ.
const B6: [[f32; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
const F4_AT: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];
const F4_G: [[f32; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
const F4: Transform<4, 6, 3> = Transform {
    at: fold(F4_AT),
    a: fold(transpose(F4_AT)),
    g: fold(F4_G),
    gt: fold(transpose(F4_G)),
    bt: fold(B6),
    b: fold(transpose(B6)),
};

const F25_AT: [[f32; 6]; 2] = [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0, -2.0, 1.0]];
const F25_G: [[f32; 5]; 6] = [
    [1.0 / 4.0, 0.0, 0.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0, 1.0 / 3.0, 2.0 / 3.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0, -1.0 / 3.0, 2.0 / 3.0],
    [0.0, 0.0, 0.0, 0.0, 1.0],
];
const F25: Transform<2, 6, 5> = Transform {
    at: fold(F25_AT),
    a: fold(transpose(F25_AT)),
    g: fold(F25_G),
    gt: fold(transpose(F25_G)),
    bt: fold(B6),
    b: fold(transpose(B6)),
};

// α = 8: points 0, ±1, ±2, ±1/2 and ∞.
const F45_AT: [[f32; 8]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.25, 0.25, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 0.125, -0.125, 1.0],
];
const F45_G: [[f32; 5]; 8] = [
    [-1.0, 0.0, 0.0, 0.0, 0.0],
    [-2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0],
    [-2.0 / 9.0, 2.0 / 9.0, -2.0 / 9.0, 2.0 / 9.0, -2.0 / 9.0],
    [1.0 / 90.0, 1.0 / 45.0, 2.0 / 45.0, 4.0 / 45.0, 8.0 / 45.0],
    [1.0 / 90.0, -1.0 / 45.0, 2.0 / 45.0, -4.0 / 45.0, 8.0 / 45.0],
    [32.0 / 45.0, 16.0 / 45.0, 8.0 / 45.0, 4.0 / 45.0, 2.0 / 45.0],
    [32.0 / 45.0, -16.0 / 45.0, 8.0 / 45.0, -4.0 / 45.0, 2.0 / 45.0],
    [0.0, 0.0, 0.0, 0.0, 1.0],
];
const F45_BT: [[f32; 8]; 8] = [
    [-1.0, 0.0, 21.0 / 4.0, 0.0, -21.0 / 4.0, 0.0, 1.0, 0.0],
    [0.0, 1.0, 1.0, -17.0 / 4.0, -17.0 / 4.0, 1.0, 1.0, 0.0],
    [0.0, -1.0, 1.0, 17.0 / 4.0, -17.0 / 4.0, -1.0, 1.0, 0.0],
    [0.0, 0.5, 0.25, -2.5, -1.25, 2.0, 1.0, 0.0],
    [0.0, -0.5, 0.25, 2.5, -1.25, -2.0, 1.0, 0.0],
    [0.0, 2.0, 4.0, -2.5, -5.0, 0.5, 1.0, 0.0],
    [0.0, -2.0, 4.0, 2.5, -5.0, -0.5, 1.0, 0.0],
    [0.0, -1.0, 0.0, 21.0 / 4.0, 0.0, -21.0 / 4.0, 0.0, 1.0],
];
const F45: Transform<4, 8, 5> = Transform {
    at: fold(F45_AT),
    a: fold(transpose(F45_AT)),
    g: fold(F45_G),
    gt: fold(transpose(F45_G)),
    bt: fold(F45_BT),
    b: fold(transpose(F45_BT)),
};

/// A transform as a type, so that its coefficients are compile-time constants wherever it is
/// used: the compiler then drops the zero terms and keeps the tile in registers.
pub(super) trait Coefs<const M: usize, const A: usize, const R: usize>: Sync {
    /// A reference to a static, so that every coefficient and pair flag is a load from constant
    /// memory, which the compiler folds (a by-value generic constant becomes a stack copy).
    const T: &'static Transform<M, A, R>;
}
pub(super) struct F23;
impl Coefs<2, 4, 3> for F23 {
    const T: &'static Transform<2, 4, 3> = &F2;
}
pub(super) struct F43;
impl Coefs<4, 6, 3> for F43 {
    const T: &'static Transform<4, 6, 3> = &F4;
}
pub(super) struct F25T;
impl Coefs<2, 6, 5> for F25T {
    const T: &'static Transform<2, 6, 5> = &F25;
}
pub(super) struct F45T;
impl Coefs<4, 8, 5> for F45T {
    const T: &'static Transform<4, 8, 5> = &F45;
}

/// Σ c·x over the terms of `row` whose index has parity `odd` (`None`: every term), skipping
/// zero coefficients. The sum starts at −0.0, which the compiler drops (−0 + y is y for every y),
/// as it drops the multiplies by ±1; the loop body stays small, so that it unrolls and every
/// test folds away.
#[inline(always)]
fn dot<const K: usize, const W: usize>(row: &[f32; K], x: &[[f32; W]; K], odd: Option<bool>, fused: bool) -> [f32; W] {
    let mut acc = [-0.0f32; W];
    for (k, (&c, xk)) in row.iter().zip(x).enumerate() {
        if c != 0.0 && odd.is_none_or(|odd| odd == (k % 2 == 1)) {
            if fused {
                acc.iter_mut().zip(xk).for_each(|(a, v)| *a = v.mul_add(c, *a));
            } else {
                acc.iter_mut().zip(xk).for_each(|(a, v)| *a += c * v);
            }
        }
    }
    acc
}

/// `l · x` for one column `x` of W-lane values, with `l`'s pairs folded. Each term is a plain
/// multiply and add, or (`fused`) one `f32::mul_add`, fused on every path, in a fixed order: the
/// bits do not depend on the vector width.
#[inline(always)]
pub(super) fn apply<const R: usize, const K: usize, const W: usize>(
    l: &Folded<R, K>,
    x: &[[f32; W]; K],
    fused: bool,
) -> [[f32; W]; R] {
    let mut x = *x;
    for j in 0..K {
        if l.cols[j] {
            let (a, b) = (x[j], x[j + 1]);
            x[j] = std::array::from_fn(|w| a[w] + b[w]);
            x[j + 1] = std::array::from_fn(|w| a[w] - b[w]);
        }
    }
    let mut out = [[0.0f32; W]; R];
    // A fixed trip count, so that the loop unrolls and every test below folds away.
    for i in 0..R {
        if i > 0 && l.rows[i - 1] {
            continue;
        }
        if l.rows[i] {
            let (e, o) = (dot(&l.l[i], &x, Some(false), fused), dot(&l.l[i], &x, Some(true), fused));
            out[i] = std::array::from_fn(|w| e[w] + o[w]);
            out[i + 1] = std::array::from_fn(|w| e[w] - o[w]);
        } else {
            out[i] = dot(&l.l[i], &x, None, fused);
        }
    }
    out
}

/// `l · x · rᵀ` on W lanes at once, x(i, j) read by `load` and each result (i, j) handed to
/// `store`: one column of x and then one row of the intermediate at a time, so that with the
/// coefficients known at compile time the whole transform stays in vector registers.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexed on purpose: see the first loop
pub(super) fn sandwich_with<const R: usize, const K: usize, const W: usize>(
    l: &Folded<R, K>,
    r: &Folded<R, K>,
    fused: bool,
    load: impl Fn(usize, usize) -> [f32; W],
    mut store: impl FnMut(usize, usize, &[f32; W]),
) {
    // Left uninitialised until written: zero-filling it was a memset call per tile and channel
    // (α² lanes of 64 bytes; 5% of a LeNet step).
    let mut t = [[MaybeUninit::<[f32; W]>::uninit(); K]; R];
    for j in 0..K {
        let col: [[f32; W]; K] = std::array::from_fn(|i| load(i, j));
        // Indexed, not zipped with the array's by-value iterator, which went through memory.
        let out = apply(l, &col, fused);
        for i in 0..R {
            t[i][j].write(out[i]);
        }
    }
    for (i, ti) in t.iter().enumerate() {
        // SAFETY: the loop above wrote every column j of every row i.
        let ti: [[f32; W]; K] = std::array::from_fn(|j| unsafe { ti[j].assume_init() });
        for (j, v) in apply(r, &ti, fused).iter().enumerate() {
            store(i, j, v);
        }
    }
}

/// `l · x · rᵀ` of a square x, for the filter transforms (once per call).
pub(super) fn sandwich<const R: usize, const K: usize>(
    l: &Folded<R, K>,
    x: &[[f32; K]; K],
    r: &Folded<R, K>,
) -> [[f32; R]; R] {
    let mut out = [[0.0f32; R]; R];
    sandwich_with::<R, K, 1>(l, r, false, |i, j| [x[i][j]], |i, j, v| out[i][j] = v[0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `l · x` the plain way, every term.
    fn plain<const R: usize, const K: usize>(l: &[[f32; K]; R], x: &[f32; K]) -> [f32; R] {
        std::array::from_fn(|i| l[i].iter().zip(x).map(|(c, v)| (*c as f64) * (*v as f64)).sum::<f64>() as f32)
    }

    /// The folded product against the plain one on pseudo-random columns, and the pairs found.
    fn check<const R: usize, const K: usize>(name: &str, l: [[f32; K]; R], pairs: usize) {
        let f = fold(l);
        let found = f.rows.iter().chain(&f.cols).filter(|p| **p).count();
        assert_eq!(found, pairs, "{name}: pairs found");
        let mut seed = 0x2545_f491u32;
        for _ in 0..50 {
            let x: [f32; K] = std::array::from_fn(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            });
            let got = apply(&f, &x.map(|v| [v]), false);
            let want = plain(&l, &x);
            let scale =
                x.iter().fold(0f32, |m, v| m.max(v.abs())) * l.iter().flatten().fold(0f32, |m, c| m.max(c.abs()));
            for i in 0..R {
                assert!(
                    (got[i][0] - want[i]).abs() <= 1e-6 * scale * K as f32,
                    "{name}[{i}]: {} vs {}",
                    got[i][0],
                    want[i]
                );
            }
        }
    }

    #[test]
    fn folded_transforms_equal_the_matrices() {
        // Row pairs for Bᵀ, G and A; column pairs for Aᵀ and Gᵀ: one per ±p point (p = 1 for
        // α = 4; 1, 2 for α = 6; 1, 2, 1/2 for α = 8).
        check("F2 Bᵀ", F2_BT, 1);
        check("F2 Aᵀ", F2_AT, 1);
        check("F2 A", transpose(F2_AT), 1);
        check("F2 G", F2_G, 1);
        check("F2 Gᵀ", transpose(F2_G), 1);
        check("B6", B6, 2);
        check("B6ᵀ", transpose(B6), 2);
        check("F2 B", transpose(F2_BT), 1);
        check("F4 Aᵀ", F4_AT, 2);
        check("F4 A", transpose(F4_AT), 2);
        check("F4 G", F4_G, 2);
        check("F4 Gᵀ", transpose(F4_G), 2);
        check("F25 Aᵀ", F25_AT, 2);
        check("F25 A", transpose(F25_AT), 2);
        check("F25 G", F25_G, 2);
        check("F25 Gᵀ", transpose(F25_G), 2);
        check("B8", F45_BT, 3);
        check("B8ᵀ", transpose(F45_BT), 3);
        check("F45 Aᵀ", F45_AT, 3);
        check("F45 A", transpose(F45_AT), 3);
        check("F45 G", F45_G, 3);
        check("F45 Gᵀ", transpose(F45_G), 3);
    }
}
