//! Images in vector lanes: 16 images side by side, one f32 lane each, so that every tile
//! transform is a handful of vector adds. Planes go into lanes and back through 16×16 register
//! transposes; `isa::vectorized` compiles them for the GEMM path's vector set.

use super::{Lane, LANES};
use crate::backend::cpu::isa::Isa;
use crate::backend::Activation;

/// Transposes a square of 16 rows of 16 values in place: `sq[i][j]` becomes `sq[j][i]`.
pub(super) type Transpose = unsafe fn(&mut [Lane; LANES]);

fn transpose16_plain(sq: &mut [Lane; LANES]) {
    let t: [Lane; LANES] = std::array::from_fn(|j| std::array::from_fn(|i| sq[i][j]));
    *sq = t;
}

/// The same in 64 register shuffles: pairs of rows interleaved by 1, then by 2 values, then
/// 128-bit quarters exchanged twice.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16_avx512(sq: &mut [Lane; LANES]) {
    use std::arch::x86_64::*;
    let p = sq.as_mut_ptr() as *mut f32;
    let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(p.add(16 * i)));
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // Within each group of four: (t0,t2) lo/hi then (t1,t3) lo/hi.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let base = i & !3;
        let (a, b) = if i % 4 < 2 { (t[base], t[base + 2]) } else { (t[base + 1], t[base + 3]) };
        let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
        _mm512_castpd_ps(if i % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) })
    });
    // Groups of eight: (u0..3, u4..7) even quarters, then odd quarters.
    let v: [__m512; 16] = std::array::from_fn(|i| {
        let (base, j) = (i & !7, i % 4);
        let (a, b) = (u[base + j], u[base + 4 + j]);
        if i % 8 < 4 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    });
    let out: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (v[i % 8], v[8 + i % 8]);
        if i < 8 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    });
    for (i, o) in out.iter().enumerate() {
        _mm512_storeu_ps(p.add(16 * i), *o);
    }
}

/// The same on AVX2: four 8×8 blocks, each by interleaving pairs of rows by 1 and 2 values and
/// exchanging 128-bit halves, written to the mirrored block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose16_avx2(sq: &mut [Lane; LANES]) {
    use std::arch::x86_64::*;
    let p = sq.as_mut_ptr() as *mut f32;
    // Block (bi, bj) holds rows 8·bi.. and columns 8·bj..; all are read before any is written.
    let blocks: [[__m256; 8]; 4] = std::array::from_fn(|b| {
        let (bi, bj) = (b / 2, b % 2);
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(16 * (8 * bi + i) + 8 * bj)));
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        let u: [__m256; 8] = std::array::from_fn(|i| {
            let base = i & !3;
            let (a, b) = if i % 4 < 2 { (t[base], t[base + 2]) } else { (t[base + 1], t[base + 3]) };
            if i % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xee>(a, b)
            }
        });
        std::array::from_fn(|i| {
            let (a, b) = (u[i % 4], u[4 + i % 4]);
            if i < 4 {
                _mm256_permute2f128_ps::<0x20>(a, b)
            } else {
                _mm256_permute2f128_ps::<0x31>(a, b)
            }
        })
    });
    for (b, rows) in blocks.iter().enumerate() {
        let (bi, bj) = (b / 2, b % 2);
        for (i, row) in rows.iter().enumerate() {
            _mm256_storeu_ps(p.add(16 * (8 * bj + i) + 8 * bi), *row);
        }
    }
}

/// The transpose for `isa`'s path.
pub(super) fn transposer(isa: Isa) -> Transpose {
    #[cfg(target_arch = "x86_64")]
    if isa.supported() {
        match isa {
            Isa::Avx512 => return transpose16_avx512,
            Isa::Avx2 => return transpose16_avx2,
            Isa::Portable => {}
        }
    }
    transpose16_plain
}

/// Channel planes of `count` images (`src[i][c]`, h×w) into lanes: `dst[c][y0 + y][x0 + x]`
/// (rows of `wp`, `hp` rows a channel) holds pixel (y, x) of every image; the rest of `dst`,
/// and the lanes past `count`, are zero. Sixteen pixels of sixteen images go at a time, read
/// along each image's row and written as whole lanes.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn to_lanes(
    src: &[f32],
    count: usize,
    chans: usize,
    (h, w): (usize, usize),
    (hp, wp): (usize, usize),
    (y0, x0): (usize, usize),
    tr: Transpose,
    dst: &mut [Lane],
) {
    // Stale values past column n land in lanes never copied.
    let mut t = [[0.0f32; LANES]; LANES];
    for c in 0..chans {
        let plane = &mut dst[c * hp * wp..(c + 1) * hp * wp];
        plane[..y0 * wp].fill([0.0; LANES]);
        plane[(y0 + h) * wp..].fill([0.0; LANES]);
        for y in 0..h {
            let line = &mut plane[(y0 + y) * wp..(y0 + y + 1) * wp];
            line[..x0].fill([0.0; LANES]);
            line[x0 + w..].fill([0.0; LANES]);
            for j0 in (0..w).step_by(LANES) {
                let n = LANES.min(w - j0);
                t[count..].fill([0.0; LANES]);
                for (i, row) in t.iter_mut().enumerate().take(count) {
                    let at = ((i * chans + c) * h + y) * w + j0;
                    // A short row (14 of LeNet's and SimpleConv's maps) is read as a whole vector
                    // where the slice goes on: the values past n are the next row's, and land in
                    // lanes never copied. Element by element it took 4% of a pass.
                    match src.get(at..at + LANES) {
                        Some(full) => *row = full.try_into().unwrap(),
                        None => row.iter_mut().zip(&src[at..at + n]).for_each(|(d, v)| *d = *v),
                    }
                }
                // SAFETY: `tr` comes from `transposer`, which checked the CPU.
                unsafe { tr(&mut t) };
                line[x0 + j0..x0 + j0 + n].copy_from_slice(&t[..n]);
            }
        }
    }
}

/// The inverse of `to_lanes` for an output: `dst[i][c][y][x] = act(src[c][y][x][i] + b[c])`
/// for the first `count` lanes, from lane planes of `wp`-wide rows (`hp` rows a channel).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn from_lanes(
    src: &[Lane],
    count: usize,
    chans: usize,
    (h, w): (usize, usize),
    (hp, wp): (usize, usize),
    b: Option<&[f32]>,
    act: Activation,
    tr: Transpose,
    dst: &mut [f32],
) {
    let mut t = [[0.0f32; LANES]; LANES];
    for c in 0..chans {
        let bias = b.map_or(0.0, |b| b[c]);
        for y in 0..h {
            let line = &src[(c * hp + y) * wp..(c * hp + y) * wp + w];
            for j0 in (0..w).step_by(LANES) {
                let n = LANES.min(w - j0);
                // Rows past n are stale and land in columns never copied.
                t[..n].copy_from_slice(&line[j0..j0 + n]);
                // SAFETY: as in `to_lanes`.
                unsafe { tr(&mut t) };
                for (i, row) in t.iter().enumerate().take(count) {
                    let at = ((i * chans + c) * h + y) * w + j0;
                    let out = dst[at..at + n].iter_mut().zip(row);
                    match (b.is_some(), act) {
                        (false, Activation::Identity) => out.for_each(|(o, v)| *o = *v),
                        _ => out.for_each(|(o, v)| *o = act.apply(v + bias)),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_agree_with_the_definition() {
        let sq: [Lane; LANES] = std::array::from_fn(|i| std::array::from_fn(|j| (i * 100 + j) as f32));
        let mut plain = sq;
        transpose16_plain(&mut plain);
        for i in 0..LANES {
            for j in 0..LANES {
                assert_eq!(plain[j][i], sq[i][j]);
            }
        }
        for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
            let mut fast = sq;
            // SAFETY: transposer checks the CPU.
            unsafe { transposer(isa)(&mut fast) };
            assert_eq!(fast, plain, "{isa}");
        }
    }
}
