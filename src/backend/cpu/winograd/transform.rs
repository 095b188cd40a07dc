//! The Winograd transforms: the Toom-Cook matrices of F(2,3), F(4,3), F(2,5) and F(4,5), as
//! compile-time constants, and the sandwich `l·x·rᵀ` that applies them to a tile.

/// The three transforms of F(m×m, r×r), α = m + r − 1. The matrices are the Toom-Cook ones for
/// the interpolation points 0, ±1, ±2 (and ±1/2 for α = 8) and ∞.
pub(super) struct Transform<const M: usize, const A: usize, const R: usize> {
    /// Output: y = Aᵀ·M·A.
    pub(super) at: [[f32; A]; M],
    /// Output gradient, for the weight gradient: A·dy·Aᵀ.
    pub(super) a: [[f32; M]; A],
    /// Filter: U = G·w·Gᵀ.
    pub(super) g: [[f32; R]; A],
    /// Filter gradient: dw = Gᵀ·dU·G.
    pub(super) gt: [[f32; A]; R],
    /// Input: V = Bᵀ·d·B.
    pub(super) bt: [[f32; A]; A],
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
const F2: Transform<2, 4, 3> = Transform {
    at: F2_AT,
    a: transpose(F2_AT),
    g: F2_G,
    gt: transpose(F2_G),
    bt: [[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]],
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
const F4: Transform<4, 6, 3> = Transform { at: F4_AT, a: transpose(F4_AT), g: F4_G, gt: transpose(F4_G), bt: B6 };

const F25_AT: [[f32; 6]; 2] = [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0, -2.0, 1.0]];
const F25_G: [[f32; 5]; 6] = [
    [1.0 / 4.0, 0.0, 0.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0, 1.0 / 3.0, 2.0 / 3.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0, -1.0 / 3.0, 2.0 / 3.0],
    [0.0, 0.0, 0.0, 0.0, 1.0],
];
const F25: Transform<2, 6, 5> = Transform { at: F25_AT, a: transpose(F25_AT), g: F25_G, gt: transpose(F25_G), bt: B6 };

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
const F45: Transform<4, 8, 5> = Transform {
    at: F45_AT,
    a: transpose(F45_AT),
    g: F45_G,
    gt: transpose(F45_G),
    bt: [
        [-1.0, 0.0, 21.0 / 4.0, 0.0, -21.0 / 4.0, 0.0, 1.0, 0.0],
        [0.0, 1.0, 1.0, -17.0 / 4.0, -17.0 / 4.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 17.0 / 4.0, -17.0 / 4.0, -1.0, 1.0, 0.0],
        [0.0, 0.5, 0.25, -2.5, -1.25, 2.0, 1.0, 0.0],
        [0.0, -0.5, 0.25, 2.5, -1.25, -2.0, 1.0, 0.0],
        [0.0, 2.0, 4.0, -2.5, -5.0, 0.5, 1.0, 0.0],
        [0.0, -2.0, 4.0, 2.5, -5.0, -0.5, 1.0, 0.0],
        [0.0, -1.0, 0.0, 21.0 / 4.0, 0.0, -21.0 / 4.0, 0.0, 1.0],
    ],
};

/// A transform as a type, so that its coefficients are compile-time constants wherever it is
/// used: the compiler then drops the zero terms and keeps the tile in registers.
pub(super) trait Coefs<const M: usize, const A: usize, const R: usize>: Sync {
    const T: Transform<M, A, R>;
}
pub(super) struct F23;
impl Coefs<2, 4, 3> for F23 {
    const T: Transform<2, 4, 3> = F2;
}
pub(super) struct F43;
impl Coefs<4, 6, 3> for F43 {
    const T: Transform<4, 6, 3> = F4;
}
pub(super) struct F25T;
impl Coefs<2, 6, 5> for F25T {
    const T: Transform<2, 6, 5> = F25;
}
pub(super) struct F45T;
impl Coefs<4, 8, 5> for F45T {
    const T: Transform<4, 8, 5> = F45;
}

/// `l · x` for one column `x` of W-lane values, skipping zero coefficients (half of Bᵀ and Aᵀ).
#[inline(always)]
pub(super) fn apply<const R: usize, const K: usize, const W: usize>(
    l: &[[f32; K]; R],
    x: &[[f32; W]; K],
) -> [[f32; W]; R] {
    let mut out = [[0.0f32; W]; R];
    for (o, li) in out.iter_mut().zip(l) {
        for (&c, xk) in li.iter().zip(x) {
            if c != 0.0 {
                o.iter_mut().zip(xk).for_each(|(a, b)| *a += c * b);
            }
        }
    }
    out
}

/// `l · x · rᵀ` on W lanes at once, x(i, j) read by `load` and each result (i, j) handed to
/// `store`: one column of x and then one row of the intermediate at a time, so that with the
/// coefficients known at compile time the whole transform stays in vector registers.
#[inline(always)]
pub(super) fn sandwich_with<const R: usize, const K: usize, const W: usize>(
    l: &[[f32; K]; R],
    r: &[[f32; K]; R],
    load: impl Fn(usize, usize) -> [f32; W],
    mut store: impl FnMut(usize, usize, &[f32; W]),
) {
    let mut t = [[[0.0f32; W]; K]; R];
    for j in 0..K {
        let mut col = [[0.0f32; W]; K];
        for (i, c) in col.iter_mut().enumerate() {
            *c = load(i, j);
        }
        for (ti, v) in t.iter_mut().zip(apply(l, &col)) {
            ti[j] = v;
        }
    }
    for (i, ti) in t.iter().enumerate() {
        for (j, v) in apply(r, ti).iter().enumerate() {
            store(i, j, v);
        }
    }
}

/// `l · x · rᵀ` of a square x, for the filter transforms (once per call).
pub(super) fn sandwich<const R: usize, const K: usize>(
    l: &[[f32; K]; R],
    x: &[[f32; K]; K],
    r: &[[f32; K]; R],
) -> [[f32; R]; R] {
    let mut out = [[0.0f32; R]; R];
    sandwich_with::<R, K, 1>(l, r, |i, j| [x[i][j]], |i, j, v| out[i][j] = v[0]);
    out
}
