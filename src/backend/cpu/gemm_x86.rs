//! The x86 micro-kernels of `gemm.rs`: the portable tile, one vector of columns at a time.
//!
//! Shapes: AVX-512 8×(16·V) (at V = 3, 24 of the 32 zmm registers accumulate and 3 hold B),
//! AVX2 6×(8·V) (at V = 2, 12 of the 16 ymm registers accumulate, 2 hold B, 1 the broadcast of
//! A); V = 1 serves the last columns of a block. Each output is the same FMA chain as
//! `portable_tile`'s, so all three agree to the bit. `IN_PLACE` reads A where it lies (row r at
//! `a + r·lda`, contiguous along the reduction) instead of from a packed strip; the arithmetic is
//! the same.

use std::arch::x86_64::*;

/// # Safety
/// AVX-512F present; `a` holds kc·8 values (or, `IN_PLACE`, 8 rows of kc values `lda` apart),
/// `b` kc rows of 16·V values `ldb` apart, `c` an 8×(16·V) tile with row stride `rs`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub unsafe fn avx512_tile<const V: usize, const IN_PLACE: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rs: usize,
    first: bool,
) {
    const MR: usize = 8;
    let (ars, aps) = if IN_PLACE { (lda, 1) } else { (1, MR) };
    let mut acc = [[_mm512_setzero_ps(); V]; MR];
    for p in 0..kc {
        let bp = b.add(p * ldb);
        let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
        let ap = a.add(p * aps);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(r * ars));
            for (x, bx) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(av, *bx, *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            let o = c.add(r * rs + 16 * v);
            _mm512_storeu_ps(o, if first { *x } else { _mm512_add_ps(_mm512_loadu_ps(o), *x) });
        }
    }
}

/// # Safety
/// AVX2 and FMA present; `a` holds kc·6 values (or, `IN_PLACE`, 6 rows of kc values `lda`
/// apart), `b` kc rows of 8·V values `ldb` apart, `c` a 6×(8·V) tile with row stride `rs`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_tile<const V: usize, const IN_PLACE: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rs: usize,
    first: bool,
) {
    const MR: usize = 6;
    let (ars, aps) = if IN_PLACE { (lda, 1) } else { (1, MR) };
    let mut acc = [[_mm256_setzero_ps(); V]; MR];
    for p in 0..kc {
        let bp = b.add(p * ldb);
        let bv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(bp.add(8 * v)));
        let ap = a.add(p * aps);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*ap.add(r * ars));
            for (x, bx) in row.iter_mut().zip(&bv) {
                *x = _mm256_fmadd_ps(av, *bx, *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            let o = c.add(r * rs + 8 * v);
            _mm256_storeu_ps(o, if first { *x } else { _mm256_add_ps(_mm256_loadu_ps(o), *x) });
        }
    }
}
