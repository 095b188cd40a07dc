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
#include "rotvar_common.cuh"

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
extern "C" __global__ void __launch_bounds__(RV_THREADS)
    gemm_tiled_v2(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                  const float* __restrict__ bias, int M, int N, int K, int lda, int ldb, int ldc, int transA,
                  int transB, float alpha, float beta, int act) {
    ROTVAR_SHARED(float, As, [RV_BK][RV_BM + RV_PAD]);
    ROTVAR_SHARED(float, Bs, [RV_BK][RV_BN + RV_PAD]);
    if (blockDim.x != RV_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();

    const int m0 = blockIdx.y * RV_BM, n0 = blockIdx.x * RV_BN;
    const int tx = threadIdx.x % (RV_BN / RV_TN), ty = threadIdx.x / (RV_BN / RV_TN);
    float acc[RV_TM][RV_TN];
#pragma unroll
    for (int i = 0; i < RV_TM; ++i)
#pragma unroll
        for (int j = 0; j < RV_TN; ++j) acc[i][j] = 0.f;

    float ra[RV_PER_THREAD(RV_BM)], rb[RV_PER_THREAD(RV_BN)];
    if (K > 0) {
        rv_fetch_tile<RV_BM>(ra, A, lda, transA, m0, M, 0, K);
        rv_fetch_tile<RV_BN>(rb, B, ldb, !transB, n0, N, 0, K);
    }
    for (int k0 = 0; k0 < K; k0 += RV_BK) {
        rv_store_tile<RV_BM>(As, ra, transA);
        rv_store_tile<RV_BN>(Bs, rb, !transB);
        __syncthreads();
        if (k0 + RV_BK < K) {  // lands in registers while the FMAs below run
            rv_fetch_tile<RV_BM>(ra, A, lda, transA, m0, M, k0 + RV_BK, K);
            rv_fetch_tile<RV_BN>(rb, B, ldb, !transB, n0, N, k0 + RV_BK, K);
        }
        rv_tile_fma(As, Bs, ty, tx, acc);
        __syncthreads();  // the tiles are overwritten by the next store
    }

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
