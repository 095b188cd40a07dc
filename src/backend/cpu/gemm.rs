//! The CPU matrix multiply: rotvar's own packed blocks with one register-tiled micro-kernel per
//! instruction set (the default), or the `gemm` crate (`--cpu-gemm`; see `isa.rs`).
//!
//! The layout is the usual BLIS one. A block of B (KC×NC, about 240 KiB, inside the core's L2)
//! is copied into strips NR columns wide, a block of A into strips MR rows tall, and the
//! micro-kernel multiplies one A strip by one B strip into an MR×NR tile held in vector registers;
//! each B strip (KC×NR, at most 24 KiB) stays in L1 while the A strips pass by. Packing takes any
//! strides, so transposed operands cost nothing extra, and a right-hand operand may pack itself
//! (`PackRhs`): the convolutions read the image in place that way (implicit im2col).
//!
//! Every path computes each output the same way: a chain of fused multiply-adds over one KC
//! block of the reduction, starting from zero, then added to the output (or stored, for the first
//! block). The vector width decides how many outputs go at once, never the arithmetic, so the
//! AVX-512, AVX2 and portable paths agree to the bit (see `isa.rs` for the switch).
//!
//! We call it single-threaded and parallelize outside (over images or row blocks of fixed size),
//! so results do not depend on the number of threads either.

use super::isa::{self, Isa};
use std::cell::RefCell;

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

/// Reduction depth per packed block; the same on every path, since it fixes where the partial
/// sums are added to the output.
pub const KC: usize = 128;
/// The largest one-vector tile of any kernel (8 rows of 16 on AVX-512), for the edge-tile buffer.
const EDGE_TILE: usize = 8 * 16;

/// One micro-kernel: `c[MR×W] (row stride rs) = (first ? 0 : c) + Σ_p a(·, p) ⊗ b[p][·]` over
/// `kc` steps (`b`: W values at a step of `ldb`). `a(r, p)` is `a[p·MR + r]` in a packed strip,
/// or `a[r·lda + p]` for the kernels that read A in place (`lda` is ignored by the others).
type TileFn =
    unsafe fn(kc: usize, a: *const f32, lda: usize, b: *const f32, ldb: usize, c: *mut f32, rs: usize, first: bool);

/// A micro-kernel and its edge tile: one pair reads packed strips of A, the other reads A in place.
#[derive(Clone, Copy)]
struct Tiles {
    tile: TileFn,
    /// The same tile one vector wide (`vec` columns), for the last columns of a block.
    edge: TileFn,
    /// Two vectors wide, where two or more whole vectors of columns remain (32 of LeNet fc1's
    /// 84 outputs, a 32-channel Winograd GEMM): twice the sums in flight per broadcast of A.
    edge2: TileFn,
}

struct Kernel {
    mr: usize,
    nr: usize,
    /// Rows of A per packed block.
    mc: usize,
    /// Columns of B per packed block.
    nc: usize,
    packed: Tiles,
    in_place: Tiles,
    vec: usize,
}

fn kernel(isa: Isa) -> Kernel {
    match isa {
        Isa::Portable => Kernel {
            mr: 4,
            nr: 16,
            mc: 128,
            nc: 512,
            packed: Tiles {
                tile: portable_tile::<16, false>,
                edge: portable_tile::<4, false>,
                edge2: portable_tile::<8, false>,
            },
            in_place: Tiles {
                tile: portable_tile::<16, true>,
                edge: portable_tile::<4, true>,
                edge2: portable_tile::<8, true>,
            },
            vec: 4,
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            use super::gemm_x86::avx2_tile;
            Kernel {
                mr: 6,
                nr: 16,
                mc: 120,
                nc: 512,
                // Two vectors are the whole tile here.
                packed: Tiles {
                    tile: avx2_tile::<2, false>,
                    edge: avx2_tile::<1, false>,
                    edge2: avx2_tile::<2, false>,
                },
                in_place: Tiles { tile: avx2_tile::<2, true>, edge: avx2_tile::<1, true>, edge2: avx2_tile::<2, true> },
                vec: 8,
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            use super::gemm_x86::avx512_tile;
            Kernel {
                mr: 8,
                nr: 48,
                mc: 128,
                nc: 480,
                packed: Tiles {
                    tile: avx512_tile::<3, false>,
                    edge: avx512_tile::<1, false>,
                    edge2: avx512_tile::<2, false>,
                },
                in_place: Tiles {
                    tile: avx512_tile::<3, true>,
                    edge: avx512_tile::<1, true>,
                    edge2: avx512_tile::<2, true>,
                },
                vec: 16,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("{isa} is x86-only and never reported as supported here"),
    }
}

/// The oracle micro-kernel (4 rows, NR columns): what the vector kernels do, one value at a time.
#[allow(clippy::too_many_arguments)]
unsafe fn portable_tile<const NR: usize, const IN_PLACE: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rs: usize,
    first: bool,
) {
    const MR: usize = 4;
    let (ars, aps) = if IN_PLACE { (lda, 1) } else { (1, MR) };
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        let bp = std::slice::from_raw_parts(b.add(p * ldb), NR);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = *a.add(p * aps + r * ars);
            for (v, bv) in row.iter_mut().zip(bp) {
                *v = av.mul_add(*bv, *v);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let out = std::slice::from_raw_parts_mut(c.add(r * rs), NR);
        for (o, v) in out.iter_mut().zip(row) {
            *o = if first { *v } else { *o + v };
        }
    }
}

thread_local! {
    /// Per-thread packed blocks of A and B, kept across calls.
    static PACKED: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Strips of `mr` rows: element (r, p) of the block goes to `[strip][p][r]`; rows past `m` are 0.
///
/// # Safety
/// `a` must address every element (r < m, p < kc) through `l`.
unsafe fn pack_a(m: usize, kc: usize, mr: usize, a: *const f32, l: Mat, dst: &mut [f32]) {
    for (s, strip) in dst.chunks_exact_mut(mr * kc).take(m.div_ceil(mr)).enumerate() {
        let rows = mr.min(m - s * mr);
        let base = a.offset((s * mr) as isize * l.rs);
        for (p, d) in strip.chunks_exact_mut(mr).enumerate() {
            let col = base.offset(p as isize * l.cs);
            for (r, v) in d.iter_mut().enumerate() {
                *v = if r < rows { *col.offset(r as isize * l.rs) } else { 0.0 };
            }
        }
    }
}

/// Strips of `nr` columns: element (p, j) of the block goes to `[strip][p][j]`; columns past `n`
/// are 0.
///
/// # Safety
/// `b` must address every element (p < kc, j < n) through `l`.
unsafe fn pack_b(kc: usize, n: usize, nr: usize, b: *const f32, l: Mat, dst: &mut [f32]) {
    for (t, strip) in dst.chunks_exact_mut(nr * kc).take(n.div_ceil(nr)).enumerate() {
        let cols = nr.min(n - t * nr);
        let base = b.offset((t * nr) as isize * l.cs);
        if l.cs == 1 {
            for (p, d) in strip.chunks_exact_mut(nr).enumerate() {
                d[..cols].copy_from_slice(std::slice::from_raw_parts(base.offset(p as isize * l.rs), cols));
                d[cols..].fill(0.0);
            }
        } else {
            // Eight columns at a time: eight read streams along memory when B is a transpose,
            // and one 32-byte write per step instead of eight scattered ones.
            if cols < nr {
                strip.fill(0.0);
            }
            for j0 in (0..cols).step_by(8) {
                let w = 8.min(cols - j0);
                let src: [*const f32; 8] = std::array::from_fn(|j| base.offset((j0 + j.min(w - 1)) as isize * l.cs));
                for (p, d) in strip.chunks_exact_mut(nr).enumerate() {
                    let at = p as isize * l.rs;
                    for j in 0..w {
                        d[j0 + j] = *src[j].offset(at);
                    }
                }
            }
        }
    }
}

/// A right-hand operand the GEMM packs itself: a strided matrix, or one that is never stored
/// (the im2col matrix of an image, read in place by `conv.rs`).
pub trait PackRhs {
    /// Copy rows `pc..pc+kc` and columns `jc..jc+n` into strips of `nr` columns (element (p, j)
    /// of the block at `[j / nr][p][j % nr]`), zero past column `n`.
    fn pack(&self, pc: usize, kc: usize, jc: usize, n: usize, nr: usize, dst: &mut [f32]);
}

/// A strided matrix as a right-hand operand.
struct Strided<'a> {
    b: &'a [f32],
    l: Mat,
}

impl PackRhs for Strided<'_> {
    fn pack(&self, pc: usize, kc: usize, jc: usize, n: usize, nr: usize, dst: &mut [f32]) {
        let at = pc as isize * self.l.rs + jc as isize * self.l.cs;
        // SAFETY: sgemm_with checked that `b` covers the whole k×n matrix through `l`, and
        // sgemm_rhs asks only for blocks inside it.
        unsafe { pack_b(kc, n, nr, self.b.as_ptr().offset(at), self.l, dst) }
    }
}

/// c[m×n] = (accumulate ? c : 0) + a[m×k] · b[k×n]
///
/// The slices must cover every element the strides address; checked here because a wrong
/// length would otherwise be undefined behaviour in the kernels.
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
    sgemm_on(isa::active(), m, n, k, a, la, b, lb, c, lc, accumulate)
}

/// [`sgemm`] on rotvar's `isa` path, or on the crate (None).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_on(
    isa: Option<Isa>,
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
    match isa {
        Some(i) => sgemm_with(i, m, n, k, a, la, b, lb, c, lc, accumulate),
        None => crate_sgemm(m, n, k, a, la, b, lb, c, lc, accumulate),
    }
}

/// The `gemm` crate, single-threaded, with the same checks as ours (see `isa.rs`).
#[allow(clippy::too_many_arguments)]
pub fn crate_sgemm(
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
    if m == 0 || n == 0 || k == 0 {
        return sgemm_with(Isa::Portable, m, n, k, a, la, b, lb, c, lc, accumulate);
    }
    check_extents(m, n, k, a.len(), la, b.len(), lb, c.len(), lc);
    // SAFETY: the extents just checked bound every address the strides reach.
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
        )
    }
}

/// Panics unless each slice covers every element its strides address: a wrong length would
/// otherwise be undefined behaviour in the kernels.
#[allow(clippy::too_many_arguments)]
fn check_extents(m: usize, n: usize, k: usize, a: usize, la: Mat, b: usize, lb: Mat, c: usize, lc: Mat) {
    let extent = |rows: usize, cols: usize, l: Mat| -> usize {
        assert!(l.rs >= 0 && l.cs >= 0, "sgemm: negative strides are not supported");
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * l.rs as usize + (cols - 1) * l.cs as usize + 1
        }
    };
    assert!(a >= extent(m, k, la), "sgemm: lhs too short");
    assert!(b >= extent(k, n, lb), "sgemm: rhs too short");
    assert!(c >= extent(m, n, lc), "sgemm: dst too short");
}

/// [`sgemm`] on a chosen path (which must be supported: see [`Isa::supported`]).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with(
    isa: Isa,
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
    assert!(isa.supported(), "sgemm: this CPU cannot run the {isa} path");
    check_extents(m, n, k, a.len(), la, b.len(), lb, c.len(), lc);
    if n < kernel(isa).nr && m > n {
        // Too few columns to fill the vector tile (a weight gradient with 9 or 25 of them):
        // compute cᵀ = bᵀ·aᵀ instead. fma(a, b, c) = fma(b, a, c), so the bits are the same.
        let t = |l: Mat| Mat { rs: l.cs, cs: l.rs };
        return sgemm_with(isa, n, m, k, b, t(lb), a, t(la), c, t(lc), accumulate);
    }
    sgemm_rhs(isa, m, n, k, a, la, &Strided { b, l: lb }, c, lc, accumulate)
}

/// c[m×n] = (accumulate ? c : 0) + a[m×k] · rhs[k×n] on rotvar's `isa` path, with a right-hand
/// operand that packs itself (`rhs` must answer for every element of k×n).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_rhs(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    la: Mat,
    rhs: &dyn PackRhs,
    c: &mut [f32],
    lc: Mat,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(isa.supported(), "sgemm: this CPU cannot run the {isa} path");
    // The operand packs itself and answers for its own bounds (its reads are slice-checked).
    check_extents(m, n, k, a.len(), la, usize::MAX, Mat { rs: 0, cs: 0 }, c.len(), lc);
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
    let kern = kernel(isa);
    PACKED.with(|packed| {
        let (pa, pb) = &mut *packed.borrow_mut();
        let need_a = kern.mc.min(m).div_ceil(kern.mr) * kern.mr * KC.min(k);
        let need_b = kern.nc.min(n).div_ceil(kern.nr) * kern.nr * KC.min(k);
        if pa.len() < need_a {
            pa.resize(need_a, 0.0);
        }
        if pb.len() < need_b {
            pb.resize(need_b, 0.0);
        }
        let (ap, cp) = (a.as_ptr(), c.as_mut_ptr());
        let at = |r: usize, col: usize, l: Mat| r as isize * l.rs + col as isize * l.cs;
        // SAFETY: every offset below stays inside the extents checked above: blocks are clipped
        // to m, n and k, and the kernels write full tiles only where they lie inside c.
        unsafe {
            for jc in (0..n).step_by(kern.nc) {
                let nb = kern.nc.min(n - jc);
                for pc in (0..k).step_by(KC) {
                    let kc = KC.min(k - pc);
                    let first = pc == 0 && !accumulate;
                    rhs.pack(pc, kc, jc, nb, kern.nr, pb);
                    for ic in (0..m).step_by(kern.mc) {
                        let mb = kern.mc.min(m - ic);
                        let block = ap.offset(at(ic, pc, la));
                        let lhs = if reads_in_place(la) {
                            Lhs::InPlace { a: block, lda: la.rs as usize, spare: pa.as_mut_ptr() }
                        } else {
                            pack_a(mb, kc, kern.mr, block, la, pa);
                            Lhs::Packed(pa.as_ptr())
                        };
                        let (rhs, out) = (Rhs::Packed(pb.as_ptr()), cp.offset(at(ic, jc, lc)));
                        multiply_packed(&kern, kc, lhs, mb, rhs, nb, out, lc, first);
                    }
                }
            }
        }
    })
}

/// Where the micro-kernel reads a block of A: packed strips (`mr` values per reduction step), or
/// the matrix itself when its rows run along the reduction, `lda` apart. In place saves the copy,
/// which for a tall, deep A (a dense layer's batch of inputs) cost a third of the multiply. A
/// short last strip read in place would run past A's last row: it is packed into `spare` (room
/// for one strip) with zeros below, as `pack_a` pads.
#[derive(Clone, Copy)]
enum Lhs {
    Packed(*const f32),
    InPlace { a: *const f32, lda: usize, spare: *mut f32 },
}

/// Where the micro-kernel reads a block of B: packed strips (`nr` values per reduction step), or
/// a row-major matrix whose rows lie `ldb` apart (Winograd's transformed tiles, stored that way
/// so that the same operand also serves as an in-place A): the kernels take any row step.
#[derive(Clone, Copy)]
enum Rhs {
    Packed(*const f32),
    InPlace { b: *const f32, ldb: usize },
}

/// Whether a left-hand operand laid out as `la` is read in place: its rows must run along the
/// reduction, and not lie a multiple of 4 KiB apart, where all eight rows of a strip would fall
/// into one L1 set.
fn reads_in_place(la: Mat) -> bool {
    la.cs == 1 && la.rs > 0 && !(la.rs as usize * 4).is_multiple_of(4096)
}

/// Asks for the next strip of a B read in place (`kc` rows of `cols` values, `ld` apart) into L2
/// while this one is multiplied: its rows lie in as many pages (23 KB apart in a dense layer's
/// input), each too short for the hardware prefetcher to follow.
///
/// # Safety
/// None needed for the addresses (a prefetch never faults); `b` must be derived from the operand.
#[inline(always)]
unsafe fn prefetch_strip(b: *const f32, ld: usize, kc: usize, cols: usize) {
    #[cfg(target_arch = "x86_64")]
    for p in 0..if cols > 0 { kc } else { 0 } {
        for j in (0..cols).step_by(16) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            _mm_prefetch::<_MM_HINT_T1>(b.wrapping_add(p * ld + j).cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (b, ld, kc, cols);
}

/// c[mb×nb] (= or +=) A · packed B strips, over one KC block of the reduction: whole tiles
/// straight into c, partial ones one vector of columns at a time through a buffer.
///
/// # Safety
/// `lhs` addresses `mb` rows of `kc` values (packed: `mb.div_ceil(mr)` strips of `kc × mr`),
/// `rhs` `nb.div_ceil(nr)` strips of `kc × nr` (in place: `kc` rows of `nb` values), and `c`
/// an mb×nb block through `lc`.
#[allow(clippy::too_many_arguments)]
unsafe fn multiply_packed(
    kern: &Kernel,
    kc: usize,
    lhs: Lhs,
    mb: usize,
    rhs: Rhs,
    nb: usize,
    c: *mut f32,
    lc: Mat,
    first: bool,
) {
    let at = |r: usize, col: usize| r as isize * lc.rs + col as isize * lc.cs;
    // B strip outside (it stays in L1), A strips inside (from L2).
    for jr in (0..nb).step_by(kern.nr) {
        let (bstrip, ldb) = match rhs {
            Rhs::Packed(pb) => (pb.add(jr * kc), kern.nr),
            Rhs::InPlace { b, ldb } => {
                prefetch_strip(b.wrapping_add(jr + kern.nr), ldb, kc, kern.nr.min(nb.saturating_sub(jr + kern.nr)));
                (b.add(jr), ldb)
            }
        };
        for ir in (0..mb).step_by(kern.mr) {
            let (rows, cols) = (kern.mr.min(mb - ir), kern.nr.min(nb - jr));
            let (tiles, astrip, lda) = match lhs {
                Lhs::Packed(pa) => (kern.packed, pa.add(ir * kc), 0),
                Lhs::InPlace { a, lda, .. } if rows == kern.mr => (kern.in_place, a.add(ir * lda), lda),
                Lhs::InPlace { a, lda, spare } => {
                    let strip = std::slice::from_raw_parts_mut(spare, kern.mr * kc);
                    pack_a(rows, kc, kern.mr, a.add(ir * lda), Mat::rows(lda), strip);
                    (kern.packed, spare.cast_const(), 0)
                }
            };
            let out = c.offset(at(ir, jr));
            if rows == kern.mr && cols == kern.nr && lc.cs == 1 {
                (tiles.tile)(kc, astrip, lda, bstrip, ldb, out, lc.rs as usize, first);
                continue;
            }
            let whole_rows = rows == kern.mr && lc.cs == 1;
            let mut j0 = 0;
            while j0 < cols {
                let left = cols - j0;
                let (b0, o0) = (bstrip.add(j0), out.offset(at(0, j0)));
                if whole_rows && left >= 2 * kern.vec {
                    (tiles.edge2)(kc, astrip, lda, b0, ldb, o0, lc.rs as usize, first);
                    j0 += 2 * kern.vec;
                    continue;
                }
                if whole_rows && left >= kern.vec {
                    (tiles.edge)(kc, astrip, lda, b0, ldb, o0, lc.rs as usize, first);
                    j0 += kern.vec;
                    continue;
                }
                let w = kern.vec.min(left);
                j0 += kern.vec;
                // The kernel reads whole vectors: a partial one read in place would run past the
                // operand's last row, so it is copied out with zeros after its w columns.
                let mut b_part = std::mem::MaybeUninit::<[f32; KC * 16]>::uninit();
                let (b0, ldb) = match rhs {
                    Rhs::InPlace { .. } if w < kern.vec => {
                        let part = b_part.as_mut_ptr().cast::<f32>();
                        for p in 0..kc {
                            for j in 0..kern.vec {
                                *part.add(p * kern.vec + j) = if j < w { *b0.add(p * ldb + j) } else { 0.0 };
                            }
                        }
                        (part.cast_const(), kern.vec)
                    }
                    _ => (b0, ldb),
                };
                // Not zeroed (that was a memset per partial tile, 3% of LeNet's fc1 forward):
                // the edge kernel writes all mr rows of vec values.
                let mut tile = std::mem::MaybeUninit::<[f32; EDGE_TILE]>::uninit();
                debug_assert!(kern.mr * kern.vec <= EDGE_TILE);
                (tiles.edge)(kc, astrip, lda, b0, ldb, tile.as_mut_ptr().cast(), kern.vec, true);
                let tile = tile.assume_init();
                for r in 0..rows {
                    for j in 0..w {
                        let o = o0.offset(at(r, j));
                        let v = tile[r * kern.vec + j];
                        *o = if first { v } else { *o + v };
                    }
                }
            }
        }
    }
}

/// How [`sgemm_prepacked`] reads its left-hand operand (m×k): for each block of `KC` columns of
/// the reduction, for each block of MC rows, the rows in strips of `mr`, each strip
/// `[column in block][row in strip]`. `offset(r, p)` is element (r, p); rows past m in the last
/// strip are read but never reach the output.
#[derive(Clone, Copy, Debug)]
pub struct LhsLayout {
    pub mr: usize,
    mc: usize,
    k: usize,
    /// m rounded up to whole strips.
    rows: usize,
}

impl LhsLayout {
    pub fn new(isa: Isa, m: usize, k: usize) -> LhsLayout {
        let kern = kernel(isa);
        LhsLayout { mr: kern.mr, mc: kern.mc, k, rows: m.div_ceil(kern.mr) * kern.mr }
    }
    /// Values the packed operand occupies.
    pub fn len(&self) -> usize {
        self.rows * self.k
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn offset(&self, r: usize, p: usize) -> usize {
        // MC is a whole number of strips, so every block before (pc, ic) is full.
        let (pc, ic) = (p / KC * KC, r / self.mc * self.mc);
        let kc = KC.min(self.k - pc);
        pc * self.rows + ic * kc + (r - ic) / self.mr * self.mr * kc + (p - pc) * self.mr + (r - ic) % self.mr
    }
}

/// A left-hand operand packed once and multiplied many times ([`sgemm_prepacked`]): Winograd
/// multiplies each transformed filter by every block of transformed inputs, and repacking it
/// each time cost as much as the multiply.
pub struct PackedLhs {
    pub layout: LhsLayout,
    pub data: Vec<f32>,
}

impl PackedLhs {
    pub fn new(isa: Isa, m: usize, k: usize, a: &[f32], la: Mat) -> PackedLhs {
        assert!(isa.supported(), "sgemm: this CPU cannot run the {isa} path");
        check_extents(m, 0, k, a.len(), la, 0, Mat::rows(0), 0, Mat::rows(0));
        let kern = kernel(isa);
        let layout = LhsLayout::new(isa, m, k);
        let mut data = vec![0.0f32; layout.len()];
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            for ic in (0..m).step_by(kern.mc) {
                let mb = kern.mc.min(m - ic);
                let (off, len) = (layout.offset(ic, pc), mb.div_ceil(kern.mr) * kern.mr * kc);
                // SAFETY: the block lies inside the extents checked above.
                unsafe {
                    let at = ic as isize * la.rs + pc as isize * la.cs;
                    pack_a(mb, kc, kern.mr, a.as_ptr().offset(at), la, &mut data[off..off + len]);
                }
            }
        }
        PackedLhs { layout, data }
    }
}

/// How [`sgemm_prepacked`] reads its right-hand operand (k×n): for each block of `KC` rows, the
/// columns in strips of `nr`, each strip `[row in block][column in strip]`. `offset(p, j)` is
/// element (p, j); columns past n in the last strip are read but never reach the output.
#[derive(Clone, Copy, Debug)]
pub struct RhsLayout {
    pub nr: usize,
    k: usize,
    strips: usize,
}

impl RhsLayout {
    pub fn new(isa: Isa, k: usize, n: usize) -> RhsLayout {
        let nr = kernel(isa).nr;
        RhsLayout { nr, k, strips: n.div_ceil(nr) }
    }
    /// Values the packed operand occupies.
    pub fn len(&self) -> usize {
        self.k * self.strips * self.nr
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn offset(&self, p: usize, j: usize) -> usize {
        let (pc, kc) = (p / KC * KC, KC.min(self.k - p / KC * KC));
        pc * self.strips * self.nr + (j / self.nr) * self.nr * kc + (p - pc) * self.nr + j % self.nr
    }
}

/// A right-hand operand (k×n) its caller laid out: in the packed strips of a [`RhsLayout`], or
/// row-major with rows `ld` values apart, read where it lies (a dense layer's weight, Winograd's
/// transformed tiles).
#[derive(Clone, Copy)]
pub enum RhsOperand<'a> {
    Packed(&'a [f32], RhsLayout),
    Rows(&'a [f32], usize),
}

impl RhsOperand<'_> {
    /// Panics unless the operand holds k×n for `kern`'s kernels.
    fn check(&self, kern: &Kernel, k: usize, n: usize) {
        match *self {
            RhsOperand::Packed(b, lb) => assert!(
                lb.nr == kern.nr && lb.k == k && lb.strips * lb.nr >= n && b.len() >= lb.len(),
                "sgemm: rhs layout"
            ),
            RhsOperand::Rows(b, ld) => {
                assert!(ld >= n && (k == 0 || b.len() >= (k - 1) * ld + n), "sgemm: rhs rows");
            }
        }
    }

    /// Reduction block `pc..` for the kernels.
    ///
    /// # Safety
    /// `check` passed and `pc < k`.
    unsafe fn block(&self, pc: usize) -> Rhs {
        match *self {
            RhsOperand::Packed(b, lb) => Rhs::Packed(b.as_ptr().add(lb.offset(pc, 0))),
            RhsOperand::Rows(b, ld) => Rhs::InPlace { b: b.as_ptr().add(pc * ld), ldb: ld },
        }
    }
}

/// c[m×n] = (accumulate ? c : 0) + a · b with `a` laid out by [`LhsLayout`] (as
/// [`PackedLhs`] packs it) and `b` as its caller laid it out for `isa`: the same arithmetic as
/// [`sgemm_with`], so the same bits.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_prepacked(
    isa: Isa,
    m: usize,
    n: usize,
    a: &[f32],
    la: LhsLayout,
    b: RhsOperand,
    c: &mut [f32],
    lc: Mat,
    accumulate: bool,
) {
    let k = la.k;
    if m == 0 || n == 0 {
        return;
    }
    let kern = kernel(isa);
    assert!(isa.supported(), "sgemm: this CPU cannot run the {isa} path");
    assert!(la.mr == kern.mr && la.mc == kern.mc && la.rows >= m && a.len() >= la.len(), "sgemm_prepacked: lhs layout");
    b.check(&kern, k, n);
    check_extents(m, n, 0, 0, Mat::rows(0), 0, Mat::rows(0), c.len(), lc);
    // SAFETY: the packed operands hold every strip (checked above).
    let lhs = |ic: usize, pc: usize| unsafe { Lhs::Packed(a.as_ptr().add(la.offset(ic, pc))) };
    multiply_blocks(&kern, m, n, k, lhs, b, c, lc, accumulate)
}

/// The KC × MC blocks of c[m×n] = (accumulate ? c : 0) + A · b, with A's block at (row `ic`,
/// reduction step `pc`) from `lhs`.
#[allow(clippy::too_many_arguments)]
fn multiply_blocks(
    kern: &Kernel,
    m: usize,
    n: usize,
    k: usize,
    mut lhs: impl FnMut(usize, usize) -> Lhs,
    b: RhsOperand,
    c: &mut [f32],
    lc: Mat,
    accumulate: bool,
) {
    if k == 0 {
        // No products: only the fill with zeros, the same on every path.
        return sgemm_with(Isa::Portable, m, n, 0, &[], Mat::rows(0), &[], Mat::rows(n), c, lc, accumulate);
    }
    // SAFETY: the callers checked that c covers m×n through lc, that `lhs` holds every block
    // asked for and that `b` holds k×n; each block's output lies inside c.
    unsafe {
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let rhs = b.block(pc);
            for ic in (0..m).step_by(kern.mc) {
                let mb = kern.mc.min(m - ic);
                let out = c.as_mut_ptr().offset(ic as isize * lc.rs);
                multiply_packed(kern, kc, lhs(ic, pc), mb, rhs, n, out, lc, pc == 0 && !accumulate);
            }
        }
    }
}

/// A right-hand operand packed once for many left-hand blocks ([`sgemm_packed_rhs`]): a dense
/// layer's weight, which each chunk of the batch would otherwise repack (a transposed gather of
/// the whole weight per chunk).
pub struct PackedRhs {
    pub layout: RhsLayout,
    pub data: Vec<f32>,
}

/// Strips of B per packing task in [`PackedRhs::new`].
const STRIPS_PER_PACK: usize = 8;

impl Drop for PackedRhs {
    fn drop(&mut self) {
        super::buffers::recycle(std::mem::take(&mut self.data));
    }
}

impl PackedRhs {
    /// Packs b[k×n] for `isa`; the KC blocks are packed in parallel (packing moves values, so the
    /// thread count cannot show in the result).
    pub fn new(isa: Isa, k: usize, n: usize, b: &[f32], lb: Mat) -> PackedRhs {
        use rayon::prelude::*;
        assert!(isa.supported(), "sgemm: this CPU cannot run the {isa} path");
        check_extents(0, n, k, 0, Mat::rows(0), b.len(), lb, 0, Mat::rows(0));
        let layout = RhsLayout::new(isa, k, n);
        // Recycled (a fresh 2 MB for LeNet's fc1 faulted its pages in on every call): `pack_b`
        // writes every value, the zeros past n included.
        let mut data = super::buffers::reused(layout.len());
        let strips = layout.strips * layout.nr;
        if data.is_empty() {
            return PackedRhs { layout, data };
        }
        // Over KC blocks and, within each, groups of strips: a dense layer's backward-data has a
        // single KC block (84 rows in LeNet's fc1), which one thread packed alone.
        let group = layout.nr * STRIPS_PER_PACK;
        data.par_chunks_mut(strips * KC).enumerate().for_each(|(blk, dst)| {
            let (pc, kc) = (blk * KC, dst.len() / strips);
            dst.par_chunks_mut(group * kc).enumerate().for_each(|(t, dst)| {
                let j0 = t * group;
                // SAFETY: rows pc..pc+kc and columns j0..min(j0 + group, n) lie inside the extents
                // checked above; `dst` holds exactly their strips.
                unsafe {
                    let at = pc as isize * lb.rs + j0 as isize * lb.cs;
                    pack_b(kc, group.min(n - j0), layout.nr, b.as_ptr().offset(at), lb, dst)
                }
            });
        });
        PackedRhs { layout, data }
    }
}

/// c[m×n] = (accumulate ? c : 0) + a[m×k] · b with `b` laid out by its caller (a weight packed
/// once by [`PackedRhs`] for many row blocks, or Winograd's transformed tiles) for `isa`: the
/// same arithmetic as [`sgemm_with`], so the same bits. `a` is read in place where
/// [`reads_in_place`] allows, packed block by block otherwise.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_packed_rhs(
    isa: Isa,
    m: usize,
    k: usize,
    a: &[f32],
    la: Mat,
    b: RhsOperand,
    n: usize,
    c: &mut [f32],
    lc: Mat,
    accumulate: bool,
) {
    let kern = kernel(isa);
    if m == 0 || n == 0 {
        return;
    }
    assert!(isa.supported(), "sgemm: this CPU cannot run the {isa} path");
    b.check(&kern, k, n);
    check_extents(m, n, k, a.len(), la, usize::MAX, Mat { rs: 0, cs: 0 }, c.len(), lc);
    PACKED.with(|packed| {
        let pa = &mut packed.borrow_mut().0;
        let need_a = kern.mc.min(m).div_ceil(kern.mr) * kern.mr * KC.min(k);
        if pa.len() < need_a {
            pa.resize(need_a, 0.0);
        }
        let lhs = |ic: usize, pc: usize| {
            // SAFETY: (ic, pc) is a block inside the m×k extent checked above.
            let block = unsafe { a.as_ptr().offset(ic as isize * la.rs + pc as isize * la.cs) };
            if reads_in_place(la) {
                Lhs::InPlace { a: block, lda: la.rs as usize, spare: pa.as_mut_ptr() }
            } else {
                let (mb, kc) = (kern.mc.min(m - ic), KC.min(k - pc));
                // SAFETY: as above; `pa` holds one MC×KC block.
                unsafe { pack_a(mb, kc, kern.mr, block, la, pa) };
                Lhs::Packed(pa.as_ptr())
            }
        };
        multiply_blocks(&kern, m, n, k, lhs, b, c, lc, accumulate)
    })
}

impl PackedRhs {
    /// As an operand of [`sgemm_packed_rhs`] or [`sgemm_prepacked`].
    pub fn operand(&self) -> RhsOperand<'_> {
        RhsOperand::Packed(&self.data, self.layout)
    }
}
