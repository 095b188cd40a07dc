// Tensor-core matrix multiply-accumulate through `mma.sync` (TF32 m16n8k8, BF16 m16n8k16), the
// operand roundings it needs, and one warp-tiled step over a BK = 16 slice of K-major shared
// tiles that gemm.cu and conv.cuh share.
//
// Every instruction sits in one small function with two bodies: the PTX under nvcc, and under
// the host emulator (ROTVAR_EMU) a twin that gathers the warp's fragments and computes this
// lane's share exactly as the PTX ISA lays the fragments out. The layouts come from the PTX
// ISA, section 9.7.14.5 "Matrix Fragments for mma.m16n8k8" (.tf32: figures 72, 74, 75 in the
// 9.0 edition) and "Matrix Fragments for mma.m16n8k16 with floating point type" (.bf16:
// figures 79, 82, 83), written once below as coordinate functions that the twins, the probe
// kernels (mma.cu) and the tile step all use. tests/mma_emulated.rs holds the twins to a plain
// matrix product; the same probes run on the GPU in `rotvar selftest`, where they check the
// hardware against the twins.
//
// The twins sum a lane's products in k order with fmaf starting from C. TF32 and BF16 products
// are exact in fp32 (11- and 8-bit significands), so the twin's only rounding is the sum's;
// the hardware's accumulation order and internal rounding are unspecified, which is why GPU
// and emulated tensor-core results are compared with a tolerance, never bit for bit.
#pragma once
#include "rotvar_common.cuh"

// Codes shared with backend::Precision::code.
#define RV_PREC_FP32 0
#define RV_PREC_TF32 1
#define RV_PREC_3XTF32 2
#define RV_PREC_BF16 3

// The entry points of the tc kernels take the precision as an argument and run one instance of
// their template per precision: `RV_BY_PREC(prec, (body<P>(...)))`. Other codes trap.
#define RV_BY_PREC(prec, CALL)                \
    switch (prec) {                           \
        case RV_PREC_TF32: {                  \
            constexpr int P = RV_PREC_TF32;   \
            CALL;                             \
        } break;                              \
        case RV_PREC_3XTF32: {                \
            constexpr int P = RV_PREC_3XTF32; \
            CALL;                             \
        } break;                              \
        case RV_PREC_BF16: {                  \
            constexpr int P = RV_PREC_BF16;   \
            CALL;                             \
        } break;                              \
        default: __trap();                    \
    }

// ------------------------------------------------------------ fragment coordinates
// g = lane >> 2 (groupID), t = lane & 3 (threadID_in_group).
// TF32 m16n8k8: A (16 x 8) a0..a3, B (8 x 8) b0..b1.
__device__ __forceinline__ int rv_tf32_a_row(int i, int g) { return g + 8 * (i & 1); }
__device__ __forceinline__ int rv_tf32_a_col(int i, int t) { return t + 4 * (i >> 1); }
__device__ __forceinline__ int rv_tf32_b_row(int i, int t) { return t + 4 * i; }
// BF16 m16n8k16: A (16 x 16) a0..a7, two per 32-bit register (the lower index in the low
// half); B (16 x 8) b0..b3.
__device__ __forceinline__ int rv_bf16_a_row(int i, int g) { return g + 8 * ((i >> 1) & 1); }
__device__ __forceinline__ int rv_bf16_a_col(int i, int t) { return 2 * t + (i & 1) + 8 * (i >> 2); }
__device__ __forceinline__ int rv_bf16_b_row(int i, int t) { return 2 * t + (i & 1) + 8 * (i >> 1); }
// Both: B's column is g; C/D (16 x 8) c0..c3.
__device__ __forceinline__ int rv_mma_c_row(int i, int g) { return g + 8 * (i >> 1); }
__device__ __forceinline__ int rv_mma_c_col(int i, int t) { return 2 * t + (i & 1); }

// ------------------------------------------------------------ operand roundings
// fp32 -> tf32 as cvt.rna.tf32.f32 does: to nearest, ties away from zero, keeping 10 mantissa
// bits; the low 13 bits are cleared (the PTX leaves them unspecified, so they are masked on
// the GPU too). NaN stays NaN. The CPU twin is backend::precision::round_tf32.
__device__ __forceinline__ unsigned rv_tf32(float x) {
#ifdef ROTVAR_EMU
    const unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffe000u;
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0x1000u) & 0xffffe000u;
#else
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r & 0xffffe000u;
#endif
}

// Two fp32 -> bf16 (to nearest even), lo in the low half: cvt.rn.bf16x2.f32. The CPU twin is
// backend::precision::round_bf16 (the half crate's bf16::from_f32).
__device__ __forceinline__ unsigned rv_bf16_bits(float x) {
    const unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u | ((u >> 16) & 0x8000u);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ unsigned rv_bf16x2(float lo, float hi) {
#ifdef ROTVAR_EMU
    return rv_bf16_bits(lo) | (rv_bf16_bits(hi) << 16);
#else
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}
__device__ __forceinline__ float rv_bf16_lo(unsigned r) { return __uint_as_float(r << 16); }
__device__ __forceinline__ float rv_bf16_hi(unsigned r) { return __uint_as_float(r & 0xffff0000u); }

// ------------------------------------------------------------ mma.sync and its twins
// d += A (16x8, tf32) * B (8x8, tf32), fp32 accumulate; all 32 lanes of the warp take part.
__device__ __forceinline__ void rv_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#ifdef ROTVAR_EMU
    struct Frag {
        unsigned a[4], b[2];
    } mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all[32];
    rotvar_emu::warp_allgather(mine, all);
    float A[16][8], B[8][8];
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 4; ++i) A[rv_tf32_a_row(i, g)][rv_tf32_a_col(i, t)] = __uint_as_float(all[lane].a[i]);
        for (int i = 0; i < 2; ++i) B[rv_tf32_b_row(i, t)][g] = __uint_as_float(all[lane].b[i]);
    }
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int r = rv_mma_c_row(i, g), c = rv_mma_c_col(i, t);
        float acc = d[i];
        for (int k = 0; k < 8; ++k) acc = fmaf(A[r][k], B[k][c], acc);
        d[i] = acc;
    }
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += A (16x16, bf16) * B (16x8, bf16), fp32 accumulate.
__device__ __forceinline__ void rv_mma_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#ifdef ROTVAR_EMU
    struct Frag {
        unsigned a[4], b[2];
    } mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all[32];
    rotvar_emu::warp_allgather(mine, all);
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 8; ++i) {
            const unsigned r = all[lane].a[i >> 1];
            A[rv_bf16_a_row(i, g)][rv_bf16_a_col(i, t)] = (i & 1) ? rv_bf16_hi(r) : rv_bf16_lo(r);
        }
        for (int i = 0; i < 4; ++i) {
            const unsigned r = all[lane].b[i >> 1];
            B[rv_bf16_b_row(i, t)][g] = (i & 1) ? rv_bf16_hi(r) : rv_bf16_lo(r);
        }
    }
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int r = rv_mma_c_row(i, g), c = rv_mma_c_col(i, t);
        float acc = d[i];
        for (int k = 0; k < 16; ++k) acc = fmaf(A[r][k], B[k][c], acc);
        d[i] = acc;
    }
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// 3xTF32: x = hi + lo with both halves tf32, and a*b ~ lo_a*hi_b + hi_a*lo_b + hi_a*hi_b (the
// small terms first; lo_a*lo_b is below fp32's resolution). About fp32's accuracy at three
// tensor-core products per product.
__device__ __forceinline__ void rv_split_tf32(float x, unsigned& hi, unsigned& lo) {
    hi = rv_tf32(x);
    lo = rv_tf32(x - __uint_as_float(hi));
}

// ------------------------------------------------------------ one slice of a block tile
// A block of 256 threads (8 warps) multiplies one BK = 16 slice of two K-major shared tiles,
// As[k][m] (row stride sa) and Bs[k][n] (row stride sb), into its BM x BN accumulators. The
// warps form a WARPS_M x WARPS_N grid of WM x WN warp tiles, each MT x NT mma tiles:
//   64 x 64: 2 x 4 warps of 32 x 16 (2 x 2 tiles);  32 x 128 and 16 x 256: 16 x 32 (1 x 4);
//   128 x 128 (v5): 2 x 4 warps of 64 x 32 (4 x 4 tiles: each A fragment feeds 4 mma, each B 4).
// Which physical k feeds which mma k position is free as long as A and B agree: position p
// reads k = 2p (p < 4) or 2(p - 4) + 1 in TF32, so a warp's 32 lanes read 32 different banks
// when the strides are 4 (mod 32), as the PAD = 4 tiles of gemm.cu and conv.cuh are (and 20,
// the 16-row tile: 2 * 20 = 8 mod 32). BF16's natural k order has the same property.
template <int PREC, int BM, int BN>
struct RvTcTile {
    static constexpr int WARPS_M = BM >= 32 ? 2 : 1, WARPS_N = 8 / WARPS_M;
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MT = WM / 16, NT = WN / 8;
    static_assert((BM * BN == 4096 || (BM == 128 && BN == 128)) && MT >= 1 && NT >= 1 && WM % 16 == 0 &&
                      WN % 8 == 0,
                  "tile shape");
    static_assert(PREC == RV_PREC_TF32 || PREC == RV_PREC_3XTF32 || PREC == RV_PREC_BF16, "precision");
    float c[MT][NT][4];
    int wm, wn, g, t;

    __device__ __forceinline__ RvTcTile() {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        wm = (warp % WARPS_M) * WM;
        wn = (warp / WARPS_M) * WN;
        g = lane >> 2;
        t = lane & 3;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int q = 0; q < 4; ++q) c[i][j][q] = 0.f;
    }

    static __device__ __forceinline__ int tf32_k(int p) { return p < 4 ? 2 * p : 2 * (p - 4) + 1; }

    __device__ __forceinline__ void step(const float* As, int sa, const float* Bs, int sb) {
        if constexpr (PREC == RV_PREC_BF16) {
            unsigned a[MT][4], b[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int r = 0; r < 4; ++r) {  // register r holds elements 2r (low) and 2r + 1
                    const int row = wm + 16 * i + rv_bf16_a_row(2 * r, g), k = rv_bf16_a_col(2 * r, t);
                    a[i][r] = rv_bf16x2(As[k * sa + row], As[(k + 1) * sa + row]);
                }
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int col = wn + 8 * j + g, k = rv_bf16_b_row(2 * r, t);
                    b[j][r] = rv_bf16x2(Bs[k * sb + col], Bs[(k + 1) * sb + col]);
                }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) rv_mma_bf16(c[i][j], a[i], b[j]);
        } else {
#pragma unroll
            for (int kb = 0; kb < 16; kb += 8) {
                unsigned ah[MT][4], bh[NT][2], al[MT][4], bl[NT][2];
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float v = As[(kb + tf32_k(rv_tf32_a_col(q, t))) * sa + wm + 16 * i + rv_tf32_a_row(q, g)];
                        if constexpr (PREC == RV_PREC_3XTF32) rv_split_tf32(v, ah[i][q], al[i][q]);
                        else ah[i][q] = rv_tf32(v);
                    }
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int q = 0; q < 2; ++q) {
                        const float v = Bs[(kb + tf32_k(rv_tf32_b_row(q, t))) * sb + wn + 8 * j + g];
                        if constexpr (PREC == RV_PREC_3XTF32) rv_split_tf32(v, bh[j][q], bl[j][q]);
                        else bh[j][q] = rv_tf32(v);
                    }
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        if constexpr (PREC == RV_PREC_3XTF32) {
                            rv_mma_tf32(c[i][j], al[i], bh[j]);
                            rv_mma_tf32(c[i][j], ah[i], bl[j]);
                        }
                        rv_mma_tf32(c[i][j], ah[i], bh[j]);
                    }
            }
        }
    }

    // Rows [lo, hi) of the accumulators to Cs[m - lo][n] (row stride sc): the 128 x 128 tile
    // goes back through shared memory a few rows at a time (its whole would need 66 KiB).
    __device__ __forceinline__ void spill_rows(float* Cs, int sc, int lo, int hi) const {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int r = wm + 16 * i + rv_mma_c_row(q, g);
                if (r < lo || r >= hi) continue;
#pragma unroll
                for (int j = 0; j < NT; ++j) Cs[(r - lo) * sc + wn + 8 * j + rv_mma_c_col(q, t)] = c[i][j][q];
            }
    }

    // The accumulators to a shared BM x BN tile Cs[m][n] (row stride sc), from which each
    // thread reads back the 4 x 4 outputs the CUDA-core kernels give it: their epilogues stay
    // the same code. The caller syncs before reading.
    __device__ __forceinline__ void spill(float* Cs, int sc) const {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    Cs[(wm + 16 * i + rv_mma_c_row(q, g)) * sc + wn + 8 * j + rv_mma_c_col(q, t)] = c[i][j][q];
    }
};
