//! The CPU matrix multiply, behind one function so the GEMM crate can be swapped in one place.
//!
//! We use the `gemm` crate (the one candle uses): pure Rust, runtime dispatch to AVX2/FMA and
//! AVX-512 micro-kernels, and the fastest of the maintained pure-Rust options on the small and
//! skinny shapes that im2col convolutions produce. We always call it single-threaded and
//! parallelize outside (over images or row blocks of fixed size), so results do not depend on
//! the number of threads.

/// A strided view of a matrix: element (r, c) is at `offset + r*rs + c*cs`.
#[derive(Clone, Copy)]
pub struct Mat {
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// Row-major with `cols` columns.
    pub fn rows(cols: usize) -> Mat {
        Mat { rs: cols as isize, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns, seen as a matrix.
    pub fn transposed(cols: usize) -> Mat {
        Mat { rs: 1, cs: cols as isize }
    }
}

/// c[m×n] = (accumulate ? c : 0) + a[m×k] · b[k×n]
///
/// The slices must cover every element the strides address; checked here because a wrong
/// length would otherwise be undefined behaviour inside the crate.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    la: Mat,
    b: &[f32],
    lb: Mat,
    c: &mut [f32],
    lc: Mat,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let extent = |rows: usize, cols: usize, l: Mat| -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * l.rs as usize + (cols - 1) * l.cs as usize + 1
        }
    };
    assert!(a.len() >= extent(m, k, la), "sgemm: lhs too short");
    assert!(b.len() >= extent(k, n, lb), "sgemm: rhs too short");
    assert!(c.len() >= extent(m, n, lc), "sgemm: dst too short");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * lc.rs as usize + j * lc.cs as usize] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: the extents above bound every address the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            lc.cs,
            lc.rs,
            accumulate,
            a.as_ptr(),
            la.cs,
            la.rs,
            b.as_ptr(),
            lb.cs,
            lb.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
