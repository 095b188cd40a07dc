// FP32 GEMM, CUDA cores only (no tensor cores). Two numbered variants, both
// checked against the same reference (tests/kernels_emulated.rs) and timed
// side by side by `rotvar bench gemm`; the backend uses v2.
//
// gemm_tiled_v1: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C
//   Row-major with leading dimensions (elements):
//     transA == 0: op(A)[m,k] = A[m*lda + k]     transA != 0: A[k*lda + m]
//     transB == 0: op(B)[k,n] = B[k*ldb + n]     transB != 0: B[n*ldb + k]
//     C[m,n] = C[m*ldc + n]
//   beta == 0 never reads C (BLAS convention: C may hold garbage/NaN).
//   Launch: block = (256,1,1), grid = (ceil(N/64), ceil(M/64), 1), no dynamic
//   shared memory. Any other block size is a launch error (guarded below).
//
// variant v1: the portable baseline every later variant is checked against.
//   64x64 output tile per block, BK=16 slice of K staged in shared memory,
//   each of the 256 threads owns a 4x4 register tile (16 FMAs per 8 shared
//   loads, float4 reads). Tiles are stored K-major in shared memory for all
//   four transpose cases, so the inner loop is identical; only the global
//   load index mapping changes, chosen so consecutive threads read consecutive
//   addresses of whichever dimension is contiguous in memory. Ragged edges are
//   zero-filled on load and masked on store. No double buffering (see v2).
#include "conv.cuh"  // v4 runs conv.cuh's 128 x 128 main loop (which includes mma.cuh)

#define RV_BM 64
#define RV_BN 64
#define RV_BK 16
#define RV_TM 4
#define RV_TN 4
#define RV_THREADS 256
// +4 keeps rows 16-byte aligned for float4 reads while shifting banks between
// consecutive k rows on the transposed shared-memory stores.
#define RV_PAD 4

// Thread -> element mapping of one op(X) tile of rows [r0, r0+ROWS) x
// k-columns [k0, k0+BK), stored K-major as S[k][row]. `trans` == 0 means X is
// [rows, K] with leading dim ld (threads walk k), otherwise X is [K, rows]
// (threads walk rows): consecutive threads read consecutive addresses.
#define RV_PER_THREAD(ROWS) (((ROWS) * RV_BK) / RV_THREADS)
__device__ __forceinline__ void rv_tile_coords(int idx, int rows, int trans, int& r, int& k) {
    if (trans) {
        r = idx % rows;
        k = idx / rows;
    } else {
        k = idx % RV_BK;
        r = idx / RV_BK;
    }
}

// Global -> registers (0 outside the matrix).
template <int ROWS>
__device__ __forceinline__ void rv_fetch_tile(float (&v)[RV_PER_THREAD(ROWS)], const float* __restrict__ X, int ld,
                                              int trans, int r0, int nrows, int k0, int K) {
#pragma unroll
    for (int it = 0; it < RV_PER_THREAD(ROWS); ++it) {
        int r, k;
        rv_tile_coords(threadIdx.x + it * RV_THREADS, ROWS, trans, r, k);
        const int gr = r0 + r, gk = k0 + k;
        float x = 0.f;
        if (gr < nrows && gk < K) x = trans ? __ldg(X + (long long)gk * ld + gr) : __ldg(X + (long long)gr * ld + gk);
        v[it] = x;
    }
}

// Registers -> shared (same mapping).
template <int ROWS>
__device__ __forceinline__ void rv_store_tile(float (*S)[ROWS + RV_PAD], const float (&v)[RV_PER_THREAD(ROWS)],
                                              int trans) {
#pragma unroll
    for (int it = 0; it < RV_PER_THREAD(ROWS); ++it) {
        int r, k;
        rv_tile_coords(threadIdx.x + it * RV_THREADS, ROWS, trans, r, k);
        S[k][r] = v[it];
    }
}

template <int ROWS>
__device__ __forceinline__ void rv_load_tile(float (*S)[ROWS + RV_PAD], const float* __restrict__ X, int ld, int trans,
                                             int r0, int nrows, int k0, int K) {
    float v[RV_PER_THREAD(ROWS)];
    rv_fetch_tile<ROWS>(v, X, ld, trans, r0, nrows, k0, K);
    rv_store_tile<ROWS>(S, v, trans);
}

// acc += As[kk][ty*4 ..] x Bs[kk][tx*4 ..] over one BK slice: 16 FMAs per two
// float4 shared reads.
__device__ __forceinline__ void rv_tile_fma(const float (*As)[RV_BM + RV_PAD], const float (*Bs)[RV_BN + RV_PAD],
                                            int ty, int tx, float (&acc)[RV_TM][RV_TN]) {
#pragma unroll
    for (int kk = 0; kk < RV_BK; ++kk) {
        const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * RV_TM]);
        const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * RV_TN]);
        const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < RV_TM; ++i)
#pragma unroll
            for (int j = 0; j < RV_TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

extern "C" __global__ void __launch_bounds__(RV_THREADS)
    gemm_tiled_v1(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C, int M, int N, int K,
                  int lda, int ldb, int ldc, int transA, int transB, float alpha, float beta) {
    ROTVAR_SHARED(float, As, [RV_BK][RV_BM + RV_PAD]);
    ROTVAR_SHARED(float, Bs, [RV_BK][RV_BN + RV_PAD]);
    if (blockDim.x != RV_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();

    const int m0 = blockIdx.y * RV_BM, n0 = blockIdx.x * RV_BN;
    const int tx = threadIdx.x % (RV_BN / RV_TN);  // 0..15 -> columns tx*4..+3
    const int ty = threadIdx.x / (RV_BN / RV_TN);  // 0..15 -> rows ty*4..+3

    float acc[RV_TM][RV_TN];
#pragma unroll
    for (int i = 0; i < RV_TM; ++i)
#pragma unroll
        for (int j = 0; j < RV_TN; ++j) acc[i][j] = 0.f;

    for (int k0 = 0; k0 < K; k0 += RV_BK) {
        rv_load_tile<RV_BM>(As, A, lda, transA, m0, M, k0, K);
        // op(B)[k,n]: transB==0 stores B as [K,N] (n contiguous), i.e. the
        // "transposed" layout from rv_load_tile's point of view.
        rv_load_tile<RV_BN>(Bs, B, ldb, !transB, n0, N, k0, K);
        __syncthreads();
        rv_tile_fma(As, Bs, ty, tx, acc);
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < RV_TM; ++i) {
        const int m = m0 + ty * RV_TM + i;
        if (m >= M) break;
        float* crow = C + (long long)m * ldc;
#pragma unroll
        for (int j = 0; j < RV_TN; ++j) {
            const int n = n0 + tx * RV_TN + j;
            if (n < N) crow[n] = beta == 0.f ? alpha * acc[i][j] : fmaf(beta, crow[n], alpha * acc[i][j]);
        }
    }
}

// The shared tiles of v2, v3 and the tc kernels, declared outside the PREC templates: a tc
// kernel holds three precision instances, and a static shared array declared in each would be
// three copies (over the 48 KiB static limit).
__device__ __forceinline__ float (*rv_tile_a())[RV_BM + RV_PAD] {
    ROTVAR_SHARED(float, As, [RV_BK][RV_BM + RV_PAD]);
    return As;
}
__device__ __forceinline__ float (*rv_tile_b())[RV_BN + RV_PAD] {
    ROTVAR_SHARED(float, Bs, [RV_BK][RV_BN + RV_PAD]);
    return Bs;
}
__device__ __forceinline__ float (*rv_tile_c())[RV_BN + RV_PAD] {
    ROTVAR_SHARED(float, Cs, [RV_BM][RV_BN + RV_PAD]);
    return Cs;
}

// The tensor-core tile of a 64 x 64 block, or nothing for fp32.
template <int PREC>
struct RvGemmTcPick {
    using T = RvTcTile<PREC, RV_BM, RV_BN>;
};
template <>
struct RvGemmTcPick<RV_PREC_FP32> {
    struct T {};
};
template <int PREC>
using RvGemmTc = typename RvGemmTcPick<PREC>::T;

// The main loop of v2 and v3: acc = op(A)[m0.., kbeg..kend) * op(B)[kbeg..kend), n0..) for this
// thread's 4x4 outputs. kbeg is a multiple of RV_BK, so a range walks the same slices as the
// whole product does; elements at or past kend load as 0.
// PREC = RV_PREC_FP32 runs rv_tile_fma; the others run the tensor-core tile of mma.cuh and bring
// its accumulators back through shared memory into the same 4x4 per thread, so the epilogues of
// v2 and v3 serve the tc kernels unchanged.
template <int PREC = RV_PREC_FP32>
__device__ __forceinline__ void rv_gemm_range(float (*As)[RV_BM + RV_PAD], float (*Bs)[RV_BN + RV_PAD],
                                              const float* __restrict__ A, const float* __restrict__ B, int M, int N,
                                              int kbeg, int kend, int lda, int ldb, int transA, int transB, int m0,
                                              int n0, int ty, int tx, float (&acc)[RV_TM][RV_TN]) {
#pragma unroll
    for (int i = 0; i < RV_TM; ++i)
#pragma unroll
        for (int j = 0; j < RV_TN; ++j) acc[i][j] = 0.f;

    RvGemmTc<PREC> tc;
    float ra[RV_PER_THREAD(RV_BM)], rb[RV_PER_THREAD(RV_BN)];
    if (kbeg < kend) {
        rv_fetch_tile<RV_BM>(ra, A, lda, transA, m0, M, kbeg, kend);
        rv_fetch_tile<RV_BN>(rb, B, ldb, !transB, n0, N, kbeg, kend);
    }
    for (int k0 = kbeg; k0 < kend; k0 += RV_BK) {
        rv_store_tile<RV_BM>(As, ra, transA);
        rv_store_tile<RV_BN>(Bs, rb, !transB);
        __syncthreads();
        if (k0 + RV_BK < kend) {  // lands in registers while the FMAs below run
            rv_fetch_tile<RV_BM>(ra, A, lda, transA, m0, M, k0 + RV_BK, kend);
            rv_fetch_tile<RV_BN>(rb, B, ldb, !transB, n0, N, k0 + RV_BK, kend);
        }
        if constexpr (PREC == RV_PREC_FP32) rv_tile_fma(As, Bs, ty, tx, acc);
        else tc.step(&As[0][0], RV_BM + RV_PAD, &Bs[0][0], RV_BN + RV_PAD);
        __syncthreads();  // the tiles are overwritten by the next store
    }
    if constexpr (PREC != RV_PREC_FP32) {
        float(*Cs)[RV_BN + RV_PAD] = rv_tile_c();
        tc.spill(&Cs[0][0], RV_BN + RV_PAD);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < RV_TM; ++i)
#pragma unroll
            for (int j = 0; j < RV_TN; ++j) acc[i][j] = Cs[ty * RV_TM + i][tx * RV_TN + j];
    }
}

// gemm_tiled_v2: C = act(alpha * op(A) * op(B) + beta * C + bias), the layout
// and launch of v1 plus two arguments:
//   bias (nullable): one value per output column, C[m,n] += bias[n] (the
//     dense layer's y[n_img, m_out] = x * w^T + b lays its outputs along n);
//   act: RV_ACT_IDENTITY or RV_ACT_RELU, applied last.
//
// variant v2: what v1 lacks, in two steps that v1 stays to be measured against.
//   1. Register double buffering: the next K slice is fetched from global
//      memory into registers before the FMAs on the current one, so global
//      latency hides behind 256 FMAs per thread with a single set of shared
//      tiles (the main loop conv.cu's kernels use).
//   2. The dense layer's epilogue fused into the store: bias and ReLU cost no
//      extra pass over C (v1 needed a bias kernel and a ReLU kernel after it,
//      each reading and writing the whole output).
template <int PREC = RV_PREC_FP32>
__device__ __forceinline__ void rv_gemm_v2(const float* __restrict__ A, const float* __restrict__ B,
                                           float* __restrict__ C, const float* __restrict__ bias, int M, int N,
                                           int K, int lda, int ldb, int ldc, int transA, int transB, float alpha,
                                           float beta, int act) {
    float(*As)[RV_BM + RV_PAD] = rv_tile_a();
    float(*Bs)[RV_BN + RV_PAD] = rv_tile_b();
    if (blockDim.x != RV_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();

    const int m0 = blockIdx.y * RV_BM, n0 = blockIdx.x * RV_BN;
    const int tx = threadIdx.x % (RV_BN / RV_TN), ty = threadIdx.x / (RV_BN / RV_TN);
    float acc[RV_TM][RV_TN];
    rv_gemm_range<PREC>(As, Bs, A, B, M, N, 0, K, lda, ldb, transA, transB, m0, n0, ty, tx, acc);

#pragma unroll
    for (int i = 0; i < RV_TM; ++i) {
        const int m = m0 + ty * RV_TM + i;
        if (m >= M) break;
        float* crow = C + (long long)m * ldc;
#pragma unroll
        for (int j = 0; j < RV_TN; ++j) {
            const int n = n0 + tx * RV_TN + j;
            if (n >= N) continue;
            float v = beta == 0.f ? alpha * acc[i][j] : fmaf(beta, crow[n], alpha * acc[i][j]);
            if (bias) v += __ldg(bias + n);
            crow[n] = rv_act(act, v);
        }
    }
}

extern "C" __global__ void __launch_bounds__(RV_THREADS)
    gemm_tiled_v2(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                  const float* __restrict__ bias, int M, int N, int K, int lda, int ldb, int ldc, int transA,
                  int transB, float alpha, float beta, int act) {
    rv_gemm_v2(A, B, C, bias, M, N, K, lda, ldb, ldc, transA, transB, alpha, beta, act);
}

// gemm_splitk_v3: v2's main loop with the reduction split across gridDim.z, for
// products whose output tiles are too few to fill the GPU: a dense layer's
// forward pass has M = batch and N = outputs (LeNet fc1 at batch 256: 4 x 2
// tiles of 64 x 64 on 132 SMs) but K = 5880 inputs. Each block writes its
// partial product, no epilogue; splitk_sum_f32 adds the partials in split
// order (no atomics: the bits depend only on the shapes and `splits`) and
// applies bias and activation.
//   partial[z][m][n] (M*N floats per split) = op(A)[m, kz] * op(B)[kz, n]
//   over split z's range [z*chunk, min((z+1)*chunk, K)), chunk =
//   roundup(ceil(K / splits), 16); an empty range writes zeros.
//   Layout and transposes as v1; alpha = 1 and beta = 0 (C is never read).
//   Launch: block = (256,1,1), grid = (ceil(N/64), ceil(M/64), splits).
template <int PREC = RV_PREC_FP32>
__device__ __forceinline__ void rv_gemm_splitk(const float* __restrict__ A, const float* __restrict__ B,
                                               float* __restrict__ partial, int M, int N, int K, int lda, int ldb,
                                               int transA, int transB, int splits) {
    float(*As)[RV_BM + RV_PAD] = rv_tile_a();
    float(*Bs)[RV_BN + RV_PAD] = rv_tile_b();
    if (blockDim.x != RV_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    if (splits < 1 || (int)gridDim.z != splits) __trap();

    const int m0 = blockIdx.y * RV_BM, n0 = blockIdx.x * RV_BN;
    const int tx = threadIdx.x % (RV_BN / RV_TN), ty = threadIdx.x / (RV_BN / RV_TN);
    const int chunk = ((K + splits - 1) / splits + RV_BK - 1) / RV_BK * RV_BK;
    const long long kb = (long long)blockIdx.z * chunk;
    const int kbeg = kb < K ? (int)kb : K, kend = kb + chunk < K ? (int)(kb + chunk) : K;
    float acc[RV_TM][RV_TN];
    rv_gemm_range<PREC>(As, Bs, A, B, M, N, kbeg, kend, lda, ldb, transA, transB, m0, n0, ty, tx, acc);

    float* out = partial + (long long)blockIdx.z * M * N;
#pragma unroll
    for (int i = 0; i < RV_TM; ++i) {
        const int m = m0 + ty * RV_TM + i;
        if (m >= M) break;
#pragma unroll
        for (int j = 0; j < RV_TN; ++j) {
            const int n = n0 + tx * RV_TN + j;
            if (n < N) out[(long long)m * N + n] = acc[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(RV_THREADS)
    gemm_splitk_v3(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ partial, int M,
                   int N, int K, int lda, int ldb, int transA, int transB, int splits) {
    rv_gemm_splitk(A, B, partial, M, N, K, lda, ldb, transA, transB, splits);
}

// gemm_tiled_v4: v2's arguments, layout and epilogue on a 128 x 128 tile, each of the 256
// threads an 8 x 8 register tile (64 FMAs per four float4 shared reads): conv.cuh's v4 main
// loop (rvc_mainloop<128>) with the operand loaders below. Per output the same FMAs in the same
// order as v1 and v2, so the same bits.
//   Launch: block = (256,1,1), grid = (ceil(N/128), ceil(M/128), 1). __launch_bounds__(256, 2):
//   128 registers, 64 of them accumulators. The host runs it where ROTVAR_CONV_TILES=v4 asks
//   (fp32, unsplit products) until a GPU has timed it against v2.
//
// One op(X) tile of ROWS rows for v4: X is [rows, K] (TRANS false, contiguous along k:
// consecutive threads walk k) or [K, rows] (TRANS true, contiguous along rows: they walk rows),
// 0 outside. A template parameter, so each main loop holds one of the two.
template <int ROWS, bool TRANS, bool V16 = false>
struct RvGemmV4Loader {
    static constexpr int E = ROWS / 16;
    const float* X;
    int ld, r0, nrows;
    __device__ __forceinline__ void fetch(int k0, int kend, float (&v)[E]) const {
        if constexpr (!TRANS) {
            const int gk = k0 + threadIdx.x % RVC_BK, r = r0 + threadIdx.x / RVC_BK;
            const float* src = X + (long long)r * ld + gk;
            const long long step = 16LL * ld;
#pragma unroll
            for (int j = 0; j < E; ++j) v[j] = (gk < kend && r + 16 * j < nrows) ? __ldg(src + j * step) : 0.f;
        } else {
            const int r = r0 + threadIdx.x % ROWS, gk = k0 + E * (threadIdx.x / ROWS);
            const float* src = X + (long long)gk * ld + r;
#pragma unroll
            for (int j = 0; j < E; ++j) v[j] = (gk + j < kend && r < nrows) ? __ldg(src + (long long)j * ld) : 0.f;
        }
    }
    __device__ __forceinline__ void store(RvcRow<ROWS>* S, const float (&v)[E]) const {
        if constexpr (TRANS) rvc_store_rowwalk<ROWS>(S, v);
        else rvc_store_kwalk<ROWS>(S, v);
    }
    // v5: the slice at k0 into S by cp.async, the tile elements fetch + store would place.
    // Rows contiguous in memory (TRANS) go 4 to a 16-byte copy where X and ld keep every
    // such group 16-byte aligned (V16, chosen per launch: a template parameter, so each main
    // loop holds one path); the rest 4 bytes per copy.
    __device__ __forceinline__ void issue(RvcRow<ROWS>* S, int k0, int kend) const {
        if constexpr (!TRANS) {
            const int kk = threadIdx.x % RVC_BK, r = threadIdx.x / RVC_BK, gk = k0 + kk;
            const float* src = X + (long long)(r0 + r) * ld + gk;
#pragma unroll
            for (int j = 0; j < E; ++j) {
                const bool ok = gk < kend && r0 + r + 16 * j < nrows;
                rv_cp_async<4>(&S[kk][r + 16 * j], ok ? src + 16LL * j * ld : X, ok ? 4 : 0);
            }
        } else if constexpr (V16) {
            constexpr int GROUPS = ROWS / 4;  // 16-byte groups per k-row
#pragma unroll
            for (int q = 0; q < RVC_BK * GROUPS / RVC_THREADS; ++q) {
                const int c = threadIdx.x + RVC_THREADS * q, r = 4 * (c % GROUPS), kk = c / GROUPS;
                const int rows = min(max(nrows - (r0 + r), 0), 4);
                const bool ok = k0 + kk < kend && rows > 0;
                rv_cp_async<16>(&S[kk][r], ok ? X + (long long)(k0 + kk) * ld + r0 + r : X, ok ? 4 * rows : 0);
            }
        } else {
            const int r = threadIdx.x % ROWS, kk = E * (threadIdx.x / ROWS), gk = k0 + kk;
            const float* src = X + (long long)gk * ld + r0 + r;
#pragma unroll
            for (int j = 0; j < E; ++j) {
                const bool ok = gk + j < kend && r0 + r < nrows;
                rv_cp_async<4>(&S[kk + j][r], ok ? src + (long long)j * ld : X, ok ? 4 : 0);
            }
        }
    }
};

template <bool TA, bool TB, bool ASYNC = false, bool V16A = false, bool V16B = false, int PREC = RV_PREC_FP32>
__device__ __forceinline__ void rv_gemm_v4(const float* __restrict__ A, const float* __restrict__ B,
                                           float* __restrict__ C, const float* __restrict__ bias, int M, int N,
                                           int K, int lda, int ldb, int ldc, float alpha, float beta, int act) {
    using Sh = RvcShape<128>;
    const int m0 = blockIdx.y * 128, n0 = blockIdx.x * 128;
    const RvGemmV4Loader<128, TA, V16A> la{A, lda, m0, M};
    const RvGemmV4Loader<128, !TB, V16B> lb{B, ldb, n0, N};
    RvcAcc<128> acc;
    static_assert(ASYNC || PREC == RV_PREC_FP32, "v4 has no tensor-core twin");
    if constexpr (ASYNC) rvc_mainloop_async<128, PREC>(la, lb, 0, K, acc);
    else rvc_mainloop<128, RV_PREC_FP32>(la, lb, 0, K, acc);
    const int tx = threadIdx.x % Sh::TX, ty = threadIdx.x / Sh::TX;
#pragma unroll
    for (int i = 0; i < Sh::TM; ++i) {
        const int m = m0 + Sh::row(ty, i);
        if (m >= M) continue;
        float* crow = C + (long long)m * ldc;
#pragma unroll
        for (int j = 0; j < Sh::TN; ++j) {
            const int n = n0 + Sh::col(tx, j);
            if (n >= N) continue;
            float v = beta == 0.f ? alpha * acc[i][j] : fmaf(beta, crow[n], alpha * acc[i][j]);
            if (bias) v += __ldg(bias + n);
            crow[n] = rv_act(act, v);
        }
    }
}

// v5's entry for one transpose pair: the operands whose rows are contiguous (A when TA, B
// unless TB) take 16-byte copies where every group of 4 rows starts 16-byte aligned.
template <bool TA, bool TB>
__device__ __forceinline__ void rv_gemm_v5(const float* __restrict__ A, const float* __restrict__ B,
                                           float* __restrict__ C, const float* __restrict__ bias, int M, int N,
                                           int K, int lda, int ldb, int ldc, float alpha, float beta, int act) {
    const auto aligned = [](const float* X, int ld) { return ((unsigned long long)X & 15) == 0 && ld % 4 == 0; };
    const bool va = TA && aligned(A, lda), vb = !TB && aligned(B, ldb);
#define RV_V5(VA, VB) rv_gemm_v4<TA, TB, true, VA, VB>(A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, beta, act)
    if constexpr (TA && !TB) {
        if (va && vb) RV_V5(true, true);
        else if (va) RV_V5(true, false);
        else if (vb) RV_V5(false, true);
        else RV_V5(false, false);
    } else if constexpr (TA) {
        if (va) RV_V5(true, false);
        else RV_V5(false, false);
    } else if constexpr (!TB) {
        if (vb) RV_V5(false, true);
        else RV_V5(false, false);
    } else {
        RV_V5(false, false);
    }
#undef RV_V5
}

extern "C" __global__ void __launch_bounds__(RV_THREADS, 2)
    gemm_tiled_v4(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                  const float* __restrict__ bias, int M, int N, int K, int lda, int ldb, int ldc, int transA,
                  int transB, float alpha, float beta, int act) {
    if (blockDim.x != RV_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    if (transA && transB) rv_gemm_v4<true, true>(A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, beta, act);
    else if (transA) rv_gemm_v4<true, false>(A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, beta, act);
    else if (transB) rv_gemm_v4<false, true>(A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, beta, act);
    else rv_gemm_v4<false, false>(A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, beta, act);
}

// gemm_tiled_v5: v4 with conv.cuh's cp.async main loop (variant v5 there): the operand tiles
// go from global to shared memory without registers, double-buffered, one barrier per slice;
// operands whose rows are contiguous move in 16-byte copies where aligned. The same FMAs in
// the same order as v4: the same bits.
//   Launch: as v4, plus 33 KiB of static shared memory (two stages of both tiles).
extern "C" __global__ void __launch_bounds__(RV_THREADS, 2)
    gemm_tiled_v5(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                  const float* __restrict__ bias, int M, int N, int K, int lda, int ldb, int ldc, int transA,
                  int transB, float alpha, float beta, int act) {
    if (blockDim.x != RV_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    if (transA && transB) rv_gemm_v5<true, true>(A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, beta, act);
    else if (transA) rv_gemm_v5<true, false>(A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, beta, act);
    else if (transB) rv_gemm_v5<false, true>(A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, beta, act);
    else rv_gemm_v5<false, false>(A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, beta, act);
}

// gemm_tc_v5: gemm_tiled_v5 on tensor cores (RvTcTile's 128 x 128 tile, 8 warps of 64 x 32;
// conv_tc.cu's tc_v5 says why), one more argument `prec` as gemm_tc. 4-byte copies only: the
// 16-byte instances would triple again, per precision, for the operands that allow them.
//   Launch: as gemm_tiled_v5. __launch_bounds__(256, 1), as the conv tc_v5 kernels.
template <int P>
__device__ __forceinline__ void rv_gemm_tc_v5(const float* __restrict__ A, const float* __restrict__ B,
                                              float* __restrict__ C, const float* __restrict__ bias, int M, int N,
                                              int K, int lda, int ldb, int ldc, int transA, int transB, float alpha,
                                              float beta, int act) {
#define RV_TC5(TA, TB) \
    rv_gemm_v4<TA, TB, true, false, false, P>(A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, beta, act)
    if (transA && transB) RV_TC5(true, true);
    else if (transA) RV_TC5(true, false);
    else if (transB) RV_TC5(false, true);
    else RV_TC5(false, false);
#undef RV_TC5
}
extern "C" __global__ void __launch_bounds__(RV_THREADS, 1)
    gemm_tc_v5(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
               const float* __restrict__ bias, int M, int N, int K, int lda, int ldb, int ldc, int transA, int transB,
               float alpha, float beta, int act, int prec) {
    if (blockDim.x != RV_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    RV_BY_PREC(prec, (rv_gemm_tc_v5<P>(A, B, C, bias, M, N, K, lda, ldb, ldc, transA, transB, alpha, beta, act)));
}

// gemm_tc, gemm_splitk_tc: v2 and v3 on tensor cores (mma.cuh), one more argument `prec`
// (RV_PREC_TF32, RV_PREC_3XTF32 or RV_PREC_BF16; anything else traps). Operands are rounded
// as they leave shared memory; accumulation, alpha, beta, bias and activation stay fp32. Same
// launches as v2 and v3, plus 17 KiB of static shared memory for the accumulators' way back
// to the 4x4 per thread. __launch_bounds__(256, 3): left to itself ptxas held them to 64
// registers and spilled; three blocks per SM allow 85.
extern "C" __global__ void __launch_bounds__(RV_THREADS, 3)
    gemm_tc(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
            const float* __restrict__ bias, int M, int N, int K, int lda, int ldb, int ldc, int transA, int transB,
            float alpha, float beta, int act, int prec) {
    RV_BY_PREC(prec, (rv_gemm_v2<P>(A, B, C, bias, M, N, K, lda, ldb, ldc, transA, transB, alpha, beta, act)));
}
extern "C" __global__ void __launch_bounds__(RV_THREADS, 3)
    gemm_splitk_tc(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ partial, int M,
                   int N, int K, int lda, int ldb, int transA, int transB, int splits, int prec) {
    RV_BY_PREC(prec, (rv_gemm_splitk<P>(A, B, partial, M, N, K, lda, ldb, transA, transB, splits)));
}

// splitk_sum_f32: C[m, n] = act(sum over z of partial[z][m][n] + bias[n]), the
// splits added in order from z = 0 (bias nullable, C with leading dim ldc).
//   Launch: block = 256, grid-stride over M*N (the backend's elementwise grid).
extern "C" __global__ void splitk_sum_f32(float* __restrict__ C, const float* __restrict__ partial,
                                          const float* __restrict__ bias, int M, int N, int ldc, int splits,
                                          int act) {
    const long long len = (long long)M * N;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        float v = partial[i];
        for (int z = 1; z < splits; ++z) v += partial[z * len + i];
        const int m = (int)(i / N), n = (int)(i % N);
        if (bias) v += __ldg(bias + n);
        C[(long long)m * ldc + n] = rv_act(act, v);
    }
}
