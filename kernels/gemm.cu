// FP32 GEMM, CUDA cores only (no tensor cores).
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
//   zero-filled on load and masked on store. No double buffering yet.
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

// Loads op(X) tile rows [r0, r0+ROWS) x k-columns [k0, k0+BK) into
// S[k][row] (K-major). `trans` == 0 means X is [rows, K] with leading dim ld,
// otherwise X is [K, rows].
template <int ROWS>
__device__ __forceinline__ void rv_load_tile(float (*S)[ROWS + RV_PAD], const float* __restrict__ X, int ld, int trans,
                                             int r0, int nrows, int k0, int K) {
    const int t = threadIdx.x;
#pragma unroll
    for (int it = 0; it < (ROWS * RV_BK) / RV_THREADS; ++it) {
        const int idx = t + it * RV_THREADS;
        int r, k;
        if (trans) {  // X[k*ld + r]: rows contiguous -> threads walk rows
            r = idx % ROWS;
            k = idx / ROWS;
        } else {  // X[r*ld + k]: k contiguous -> threads walk k
            k = idx % RV_BK;
            r = idx / RV_BK;
        }
        const int gr = r0 + r, gk = k0 + k;
        float v = 0.f;
        if (gr < nrows && gk < K) v = trans ? __ldg(X + (long long)gk * ld + gr) : __ldg(X + (long long)gr * ld + gk);
        S[k][r] = v;
    }
}

extern "C" __global__ void __launch_bounds__(RV_THREADS)
    gemm_tiled_v1(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C, int M, int N, int K,
                  int lda, int ldb, int ldc, int transA, int transB, float alpha, float beta) {
    __shared__ __align__(16) float As[RV_BK][RV_BM + RV_PAD];
    __shared__ __align__(16) float Bs[RV_BK][RV_BN + RV_PAD];
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
