//! 16 output columns in the registers of one vector set: the `Lanes` trait the direct kernels
//! are written against, its three implementations (the plain array, the portable twin; one
//! AVX-512 register; two AVX2 registers), and `compiled_for_isa!`, which compiles a kernel for
//! the vector set the engine chose with the matching implementation.

/// `fn $name(isa, args..)`: runs `$body::<S>(args..)`, an `#[inline(always)]` function generic
/// over the vector type, compiled for `isa`'s vector set with `S` its 16 lanes. (Left to the
/// autovectorizer, plain arrays went wrong twice: `mul_add` outside the feature-enabled frame
/// became a library call per value, and inside it LLVM vectorized across the accumulators with
/// gathers and scatters.)
macro_rules! compiled_for_isa {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) => $body:ident) => {
        $(#[$m])*
        fn $name(isa: $crate::backend::cpu::isa::Isa, $($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn avx512($($a: $t),*) {
                    $body::<$crate::backend::cpu::direct::lanes::x86::Zmm>($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) {
                    $body::<$crate::backend::cpu::direct::lanes::x86::Ymm2>($($a),*)
                }
                // SAFETY: each runs only where the CPU has the features it enables.
                assert!(isa.supported(), "this CPU cannot run the {isa} path");
                match isa {
                    $crate::backend::cpu::isa::Isa::Avx512 => return unsafe { avx512($($a),*) },
                    $crate::backend::cpu::isa::Isa::Avx2 => return unsafe { avx2($($a),*) },
                    $crate::backend::cpu::isa::Isa::Portable => {}
                }
            }
            $body::<[f32; $crate::backend::cpu::direct::lanes::L]>($($a),*)
        }
    };
}

/// Lanes per vector: 16 output columns.
pub(super) const L: usize = 16;

/// 16 f32 lanes in one vector set's registers. Every operation is the lane-wise one of the
/// plain array (`[f32; 16]`, the portable twin), fused where it says so, so all three give the
/// same bits.
///
/// # Safety
/// Every method may use its vector set's instructions: call them only inside the
/// `compiled_for_isa!` frame that picked the type, which runs only on a CPU that has the set.
pub(super) trait Lanes: Copy {
    /// Whether the kernels should keep two vectors per channel in flight (AVX-512's 32
    /// registers) or one (AVX2's 16, where one vector already takes two).
    const PAIRS: bool;
    unsafe fn zero() -> Self;
    unsafe fn splat(v: f32) -> Self;
    /// Which lanes a masked load reads: the first n.
    type Mask: Copy;
    unsafe fn mask(n: usize) -> Self::Mask;
    /// 16 values from `src`, which must all be readable (callers check a whole row once).
    unsafe fn load(src: *const f32) -> Self;
    /// The lanes of `m` from `src` (only those are read), the others zero.
    unsafe fn load_masked(src: *const f32, m: Self::Mask) -> Self;
    /// `self + a · b`, rounded once.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
    unsafe fn to_array(self) -> [f32; L];
    /// The first `dst.len() ≤ 16` lanes into `dst`.
    unsafe fn store_n(self, dst: &mut [f32]);
    unsafe fn add(self, b: Self) -> Self;
    /// `relu` on every lane: the value where it is above 0 or NaN, else +0.
    unsafe fn relu(self) -> Self;
}

impl Lanes for [f32; L] {
    const PAIRS: bool = true;
    unsafe fn zero() -> Self {
        [0.0; L]
    }
    unsafe fn splat(v: f32) -> Self {
        [v; L]
    }
    type Mask = usize;
    unsafe fn mask(n: usize) -> usize {
        n
    }
    unsafe fn load(src: *const f32) -> Self {
        std::ptr::read_unaligned(src as *const [f32; L])
    }
    unsafe fn load_masked(src: *const f32, n: usize) -> Self {
        std::array::from_fn(|l| if l < n { *src.add(l) } else { 0.0 })
    }
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        std::array::from_fn(|l| a[l].mul_add(b[l], self[l]))
    }
    unsafe fn to_array(self) -> [f32; L] {
        self
    }
    unsafe fn store_n(self, dst: &mut [f32]) {
        let n = dst.len();
        dst.copy_from_slice(&self[..n]);
    }
    unsafe fn add(self, b: Self) -> Self {
        std::array::from_fn(|l| self[l] + b[l])
    }
    unsafe fn relu(self) -> Self {
        self.map(crate::backend::relu)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{Lanes, L};
    use std::arch::x86_64::*;

    /// One 512-bit register.
    #[derive(Clone, Copy)]
    pub struct Zmm(__m512);

    /// Two 256-bit registers.
    #[derive(Clone, Copy)]
    pub struct Ymm2(__m256, __m256);

    impl Lanes for Zmm {
        const PAIRS: bool = true;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn zero() -> Self {
            Zmm(_mm512_setzero_ps())
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn splat(v: f32) -> Self {
            Zmm(_mm512_set1_ps(v))
        }
        type Mask = __mmask16;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn mask(n: usize) -> __mmask16 {
            mask(n)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(src: *const f32) -> Self {
            Zmm(_mm512_loadu_ps(src))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_masked(src: *const f32, m: __mmask16) -> Self {
            Zmm(_mm512_maskz_loadu_ps(m, src))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            Zmm(_mm512_fmadd_ps(a.0, b.0, self.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn to_array(self) -> [f32; L] {
            let mut out = [0.0; L];
            _mm512_storeu_ps(out.as_mut_ptr(), self.0);
            out
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store_n(self, dst: &mut [f32]) {
            assert!(dst.len() <= L);
            // SAFETY: the masked-off lanes are not written.
            _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask(dst.len()), self.0)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn add(self, b: Self) -> Self {
            Zmm(_mm512_add_ps(self.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn relu(self) -> Self {
            // "Not less or equal, unordered": true above 0 and for NaN.
            let keep = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(self.0, _mm512_setzero_ps());
            Zmm(_mm512_maskz_mov_ps(keep, self.0))
        }
    }

    fn mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// AVX2's lane masks for the first `n` of 16 lanes, one per half.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn masks(n: usize) -> (__m256i, __m256i) {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let n = n as i32;
        (_mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx), _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), idx))
    }

    impl Lanes for Ymm2 {
        const PAIRS: bool = false;
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn zero() -> Self {
            Ymm2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn splat(v: f32) -> Self {
            Ymm2(_mm256_set1_ps(v), _mm256_set1_ps(v))
        }
        type Mask = (__m256i, __m256i);
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn mask(n: usize) -> Self::Mask {
            masks(n)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load(src: *const f32) -> Self {
            Ymm2(_mm256_loadu_ps(src), _mm256_loadu_ps(src.add(8)))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load_masked(src: *const f32, (m0, m1): Self::Mask) -> Self {
            Ymm2(_mm256_maskload_ps(src, m0), _mm256_maskload_ps(src.wrapping_add(8), m1))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            Ymm2(_mm256_fmadd_ps(a.0, b.0, self.0), _mm256_fmadd_ps(a.1, b.1, self.1))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn to_array(self) -> [f32; L] {
            let mut out = [0.0; L];
            _mm256_storeu_ps(out.as_mut_ptr(), self.0);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), self.1);
            out
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store_n(self, dst: &mut [f32]) {
            assert!(dst.len() <= L);
            let (m0, m1) = masks(dst.len());
            // SAFETY: the masked-off lanes are not written.
            _mm256_maskstore_ps(dst.as_mut_ptr(), m0, self.0);
            _mm256_maskstore_ps(dst.as_mut_ptr().wrapping_add(8), m1, self.1);
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn add(self, b: Self) -> Self {
            Ymm2(_mm256_add_ps(self.0, b.0), _mm256_add_ps(self.1, b.1))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn relu(self) -> Self {
            let z = _mm256_setzero_ps();
            Ymm2(
                _mm256_and_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(self.0, z), self.0),
                _mm256_and_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(self.1, z), self.1),
            )
        }
    }
}

pub(super) use compiled_for_isa;
