// 2-D convolution (NCHW activations, OIHW weights, zero padding) as implicit
// GEMMs on CUDA cores (fp32 FMA, no tensor cores, no im2col buffer), plus the
// deterministic reductions the backward pass needs.
//
// Notation: x [N,C,H,W], w [K,C,R,S], y/dy [N,K,OH,OW],
//   OH = (H + 2*pad - R) / stride + 1, OW = (W + 2*pad - S) / stride + 1,
//   P = OH*OW, CRS = C*R*S. The host passes OH/OW; the kernels trust them.
// Offsets inside one image (C*H*W, K*OH*OW) and the GEMM extents below must
// fit in int; offsets across images are 64-bit.
//
// This header holds what the convolution kernels share: tiles, loaders, the main loop, the
// epilogues and one template per pass. The kernels are in conv.cu (CUDA cores, and the
// deterministic reductions of the backward pass) and conv_tc.cu (their tensor-core twins).
//
// ---------------------------------------------------------------- launches
// Every conv2d_* kernel: block = (256,1,1), no dynamic shared memory
// (static shared: 16 * (BM + BN + 8) * 4 bytes, 8704 for v1, and 8 * BN
// bytes more for conv2d_bwd_weight_*'s column table). Other block sizes
// __trap(); conv2d_bwd_weight_* also traps on R or S over 32767. With (BM, BN) = (64, 64) for v1, (32, 128) for *_v2_bm32
// and (16, 256) for *_v2_bm16:
//   conv2d_fwd_*:        grid = (ceil(N*OH*OW / BN), ceil(K / BM), 1)
//   conv2d_bwd_data_*:   grid = (ceil(N*H*W / BN),   ceil(C / BM), 1)
//   conv2d_bwd_data_v3:  (stride > 1) grid = (ceil(N*ceil(H/stride)*ceil(W/stride) / 64),
//                        ceil(C / 64), stride*stride)
// The host picks the tile by a cost estimate that counts the GPU's SMs
// (conv_plan in src/backend/cuda/gemm.rs), or always v1 with ROTVAR_CONV_V1=1
// (to compare).
//   conv2d_bwd_weight_*: grid = (ceil(C*R*S / BN),   ceil(K / BM), splits)
//       partial must hold splits * K*C*R*S floats (every split writes its
//       whole K x CRS slice, zeros for an empty range), then
//   sum_partials_f32:    block = 256, grid-stride (the backend's elementwise grid),
//       len = K*C*R*S, out = dW (may not alias partial).
//   channel_sum_f32:     block = 256 (any multiple of 32 up to 1024),
//       grid = (C,1,1), no dynamic shared memory.
//
// Choosing `splits` for conv2d_bwd_weight_* (Kred = N*OH*OW):
//   tiles  = ceil(K/BM) * ceil(C*R*S/BN)
//   splits = clamp(ceil(2*SMs / tiles), 1, max(1, ceil(Kred / 256)))
// i.e. two blocks per SM (264 on an H100), but never a split of fewer than
// ~256 reduction steps (16 K-tiles), where the extra partial traffic would
// outweigh the parallelism (wgrad_splits). Any splits in 1..=65535 is
// correct; the result depends (bitwise) only on the shapes and `splits`.
//
// ---------------------------------------------------------------- design
// variant v1: one shared main loop (rvc_mainloop) for all three GEMMs, the
//   same tiling as gemm_tiled_v1: 64x64 output tile per block, BK=16 slice of
//   the reduction staged K-major in shared memory, each of the 256 threads
//   owns a 4x4 register tile (16 FMAs per two float4 shared reads). The
//   operand tiles are gathered straight from the activation tensors by small
//   "loader" structs (the implicit-GEMM part); padding and ragged edges load
//   0, and stores are masked. The next slice is fetched into registers before
//   the FMAs on the current one (register double buffering), so global
//   latency hides behind compute with a single set of shared tiles.
//   Each loader picks the thread->element mapping that makes its global
//   reads coalesced: along the reduction where that dimension is contiguous
//   (weights, dy in bwd_weight, x in bwd_weight), along the GEMM columns
//   where output pixels are contiguous (x in fwd, dy in bwd_data). Per-thread
//   index decoding (n, oy, ox / c, r, s) is hoisted out of the loop where the
//   mapping keeps it fixed; otherwise one decode per slice is stepped
//   incrementally.
#pragma once
#include "cp_async.cuh"
#include "mma.cuh"

#define RVC_BK 16
#define RVC_TM 4
#define RVC_TN 4
#define RVC_THREADS 256
#define RVC_PAD 4

// A block of 256 threads computes a BM x BN output tile, each thread a TM x TN register tile.
// BM <= 64: BM * BN = 4096 and 4 x 4 per thread (v1 is 64 x 64, the v2 kernels 32 x 128 and
// 16 x 256; see "variant v2" below). BM = 128 is v4: 128 x 128, 8 x 8 per thread (see "variant
// v4"). A thread (tx, ty) = (t % TX, t / TX) owns rows row(ty, i) and columns col(tx, j): runs
// of 4, the second run of v4 half a tile further, so every k step reads whole float4s.
template <int BM>
struct RvcShape {
    static constexpr int BN = BM == 128 ? 128 : 4096 / BM;
    static constexpr int TM = BM == 128 ? 8 : 4, TN = TM;
    static constexpr int TX = BN / TN;
    static_assert(BM >= 16 && BM <= 128 && BM * BN == 256 * TM * TN && TM % 4 == 0, "tile shape");
    static __device__ __forceinline__ int row(int ty, int i) { return (i / 4) * (BM / 2) + ty * 4 + i % 4; }
    static __device__ __forceinline__ int col(int tx, int j) { return (j / 4) * (BN / 2) + tx * 4 + j % 4; }
};
// A thread's accumulators in a BM-row block.
template <int BM>
using RvcAcc = float[RvcShape<BM>::TM][RvcShape<BM>::TN];

// One k-row of a shared tile of ROWS rows (+ padding: keeps float4 reads
// aligned and shifts banks between k-rows).
template <int ROWS>
using RvcRow = float[ROWS + RVC_PAD];

// Two thread -> tile-element mappings, E = ROWS/16 elements per thread per
// slice (4 for 64 rows):
//  * k-walk: kk = t % 16, row = t / 16 + 16*j. Consecutive threads read
//    consecutive reduction indices (for operands contiguous along Kred).
//  * row-walk: row = t % ROWS, kk = E*(t / ROWS) + j. Consecutive threads read
//    consecutive GEMM columns; each thread's E kk are consecutive so it
//    decodes its reduction index once per slice and steps it.
template <int ROWS>
__device__ __forceinline__ void rvc_store_kwalk(RvcRow<ROWS>* S, const float (&v)[ROWS / 16]) {
    const int kk = threadIdx.x % RVC_BK, r = threadIdx.x / RVC_BK;
#pragma unroll
    for (int j = 0; j < ROWS / 16; ++j) S[kk][r + 16 * j] = v[j];
}
template <int ROWS>
__device__ __forceinline__ void rvc_store_rowwalk(RvcRow<ROWS>* S, const float (&v)[ROWS / 16]) {
    constexpr int E = ROWS / 16;
    const int r = threadIdx.x % ROWS, kk = E * (threadIdx.x / ROWS);
#pragma unroll
    for (int j = 0; j < E; ++j) S[kk + j][r] = v[j];
}

// Where element j of this thread goes in a k-walk or row-walk tile: the cp.async loaders (v5)
// copy straight there, each element as rvc_store_kwalk / rvc_store_rowwalk would store it.
template <int ROWS>
__device__ __forceinline__ float* rvc_kwalk_dst(RvcRow<ROWS>* S, int j) {
    return &S[threadIdx.x % RVC_BK][threadIdx.x / RVC_BK + 16 * j];
}
template <int ROWS>
__device__ __forceinline__ float* rvc_rowwalk_dst(RvcRow<ROWS>* S, int j) {
    return &S[(ROWS / 16) * (threadIdx.x / ROWS) + j][threadIdx.x % ROWS];
}

// x / d for 0 <= x < 2^31 and a divisor d >= 1 fixed for the kernel, as a multiply and a shift
// (Granlund & Montgomery's round-up method: s = ceil(log2 d), m = floor(2^32 (2^s - d) / d) + 1,
// q = (mulhi(x, m) + x) >> s; the sum cannot overflow for x < 2^31). A hardware-less integer
// division is about 15 instructions; this is three, and it is exact.
struct RvcDivisor {
    unsigned m;
    int s;
    __device__ __forceinline__ explicit RvcDivisor(int d)
        : m((unsigned)(((1ull << 32) * ((1ull << (32 - __clz(d - 1))) - (unsigned)d)) / (unsigned)d) + 1u),
          s(32 - __clz(d - 1)) {}
    __device__ __forceinline__ int div(int x) const {
        const unsigned hi = (unsigned)(((unsigned long long)(unsigned)x * m) >> 32);
        return (int)((hi + (unsigned)x) >> s);
    }
};

// Steps (c, r, s) to the next reduction index in row-major (C, R, S) order.
__device__ __forceinline__ void rvc_step_crs(int& c, int& r, int& s, int R, int S) {
    if (++s == S) {
        s = 0;
        if (++r == R) {
            r = 0;
            ++c;
        }
    }
}

// The shared tiles of a BM-row block: A and B slices, and C for the tensor cores' accumulators.
// They are declared in functions of BM alone, never of PREC: a tc kernel holds three precision
// instances, and each static shared array declared in one would be one more copy (ptxas adds
// them up, 3 x 26 KiB, over the 48 KiB static limit).
template <int BM>
__device__ __forceinline__ RvcRow<BM>* rvc_tile_a() {
    ROTVAR_SHARED(float, As, [RVC_BK][BM + RVC_PAD]);
    return As;
}
template <int BM>
__device__ __forceinline__ RvcRow<RvcShape<BM>::BN>* rvc_tile_b() {
    ROTVAR_SHARED(float, Bs, [RVC_BK][RvcShape<BM>::BN + RVC_PAD]);
    return Bs;
}
template <int BM>
__device__ __forceinline__ RvcRow<RvcShape<BM>::BN>* rvc_tile_c() {
    ROTVAR_SHARED(float, Cs, [BM][RvcShape<BM>::BN + RVC_PAD]);
    return Cs;
}

// The tensor-core tile of a BM-row conv block, or nothing for fp32.
template <int PREC, int BM>
struct RvcTcPick {
    using T = RvTcTile<PREC, BM, RvcShape<BM>::BN>;
};
template <int BM>
struct RvcTcPick<RV_PREC_FP32, BM> {
    struct T {};
};
template <int PREC, int BM>
using RvcTc = typename RvcTcPick<PREC, BM>::T;

// acc[i][j] = sum over kred in [kbeg, kend) of A[m0+ty*4+i, kred] * B[kred, n0+tx*4+j].
// Block-uniform kbeg/kend. LA/LB (tiles of BM and BN rows): fetch(k0, kend,
// v[E]) loads this thread's E elements of the slice starting at k0 (0 outside
// [.., kend) or the GEMM), store(S, v) writes them to the shared tile.
// PREC (RV_PREC_*, mma.cuh) picks the arithmetic: fp32 FMAs on CUDA cores, or tensor cores
// (RvTcTile) whose accumulators pass through shared memory into the same 4x4 per thread, so
// every epilogue below serves both.
// A B loader with `static constexpr bool kPrepares = true` has `prepare(k0, kend)`: block-wide
// work for the slice at k0 (RvcFwdBTable's decode table) that the mainloop runs before the
// barrier preceding that slice's fetch.
template <class L, class = void>
struct RvcPrepares {
    static constexpr bool value = false;
};
template <class L>
struct RvcPrepares<L, decltype(void(L::kPrepares))> {
    static constexpr bool value = L::kPrepares;
};

template <int BM>
__device__ __forceinline__ void rvc_zero(RvcAcc<BM>& acc) {
#pragma unroll
    for (int i = 0; i < RvcShape<BM>::TM; ++i)
#pragma unroll
        for (int j = 0; j < RvcShape<BM>::TN; ++j) acc[i][j] = 0.f;
}

// The CUDA-core FMAs of one BK-deep slice: acc[i][j] += As[kk][row(ty, i)] * Bs[kk][col(tx, j)]
// for kk in order, each thread's rows and columns read as float4s.
template <int BM>
__device__ __forceinline__ void rvc_fma_slice(const RvcRow<BM>* As, const RvcRow<RvcShape<BM>::BN>* Bs, int tx,
                                              int ty, RvcAcc<BM>& acc) {
    using Sh = RvcShape<BM>;
    constexpr int TM = Sh::TM, TN = Sh::TN;
#pragma unroll
    for (int kk = 0; kk < RVC_BK; ++kk) {
        float av[TM], bv[TN];
#pragma unroll
        for (int h = 0; h < TM / 4; ++h) {
            const float4 a = *reinterpret_cast<const float4*>(&As[kk][Sh::row(ty, 4 * h)]);
            av[4 * h] = a.x, av[4 * h + 1] = a.y, av[4 * h + 2] = a.z, av[4 * h + 3] = a.w;
        }
#pragma unroll
        for (int h = 0; h < TN / 4; ++h) {
            const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][Sh::col(tx, 4 * h)]);
            bv[4 * h] = b.x, bv[4 * h + 1] = b.y, bv[4 * h + 2] = b.z, bv[4 * h + 3] = b.w;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

template <int BM, int PREC, class LA, class LB>
__device__ __forceinline__ void rvc_mainloop(const LA& la, const LB& lb, int kbeg, int kend,
                                             RvcAcc<BM>& acc) {
    using Sh = RvcShape<BM>;
    constexpr int BN = Sh::BN, TM = Sh::TM, TN = Sh::TN;
    static_assert(LA::E == BM / 16 && LB::E == BN / 16, "loader tile sizes");
    RvcRow<BM>* As = rvc_tile_a<BM>();
    RvcRow<BN>* Bs = rvc_tile_b<BM>();
    const int tx = threadIdx.x % Sh::TX, ty = threadIdx.x / Sh::TX;
    rvc_zero<BM>(acc);
    if (kbeg >= kend) return;  // block-uniform: an empty split-K range

    RvcTc<PREC, BM> tc;
    float ra[LA::E], rb[LB::E];
    if constexpr (RvcPrepares<LB>::value) {
        lb.prepare(kbeg, kend);
        __syncthreads();
    }
    la.fetch(kbeg, kend, ra);
    lb.fetch(kbeg, kend, rb);
    for (int k0 = kbeg; k0 < kend; k0 += RVC_BK) {
        la.store(As, ra);
        lb.store(Bs, rb);
        if constexpr (RvcPrepares<LB>::value) {
            if (k0 + RVC_BK < kend) lb.prepare(k0 + RVC_BK, kend);  // the other table: see RvcFwdBTable
        }
        __syncthreads();
        if (k0 + RVC_BK < kend) {  // prefetch the next slice; lands during the FMAs
            la.fetch(k0 + RVC_BK, kend, ra);
            lb.fetch(k0 + RVC_BK, kend, rb);
        }
        if constexpr (PREC != RV_PREC_FP32) {
            tc.step(&As[0][0], BM + RVC_PAD, &Bs[0][0], BN + RVC_PAD);
        } else {
            rvc_fma_slice<BM>(As, Bs, tx, ty, acc);
        }
        __syncthreads();  // tiles are overwritten by the next store
    }
    if constexpr (PREC != RV_PREC_FP32) {
        RvcRow<BN>* Cs = rvc_tile_c<BM>();
        tc.spill(&Cs[0][0], BN + RVC_PAD);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = Cs[Sh::row(ty, i)][Sh::col(tx, j)];
    }
}

// variant v5: v4's tile and FMAs, its shared tiles filled by cp.async (cp_async.cuh) into two
// stages. Why: v4 stages each slice through registers (fetch, then store after the barrier):
// E loads and E shared stores per operand and thread per slice, the stores in the main loop's
// instruction stream and 2 x E registers held across the FMAs. With cp.async the loads go from
// global to shared memory without registers, the next slice's copies land while this slice's
// FMAs run, and one barrier per slice suffices (v4 has two): after the wait and the barrier,
// stage s has landed for every thread and every thread has finished reading stage s ^ 1, so
// the next slice is issued into it. The same FMAs in the same order as v4: the same bits.
// Loaders have issue(S, k0, kend): cp.async of this thread's elements of the slice at k0 into
// S, zero-filled outside [.., kend) or the matrix. With PREC a tensor-core precision the slices
// go to mma.sync (RvTcTile's 128 x 128 tile: warp tiles of 64 x 32). A B loader that prepares a decode
// table (RvcTapB) prepares it a slice further ahead than in v4, as it is read at issue.
template <int BM>
__device__ __forceinline__ RvcRow<BM> (*rvc_stages_a())[RVC_BK] {
    ROTVAR_SHARED(float, As2, [2][RVC_BK][BM + RVC_PAD]);
    return reinterpret_cast<RvcRow<BM>(*)[RVC_BK]>(&As2[0][0][0]);
}
template <int BM>
__device__ __forceinline__ RvcRow<RvcShape<BM>::BN> (*rvc_stages_b())[RVC_BK] {
    ROTVAR_SHARED(float, Bs2, [2][RVC_BK][RvcShape<BM>::BN + RVC_PAD]);
    return reinterpret_cast<RvcRow<RvcShape<BM>::BN>(*)[RVC_BK]>(&Bs2[0][0][0]);
}

template <int BM, int PREC = RV_PREC_FP32, class LA, class LB>
__device__ __forceinline__ void rvc_mainloop_async(const LA& la, const LB& lb, int kbeg, int kend,
                                                   RvcAcc<BM>& acc) {
    using Sh = RvcShape<BM>;
    constexpr int BN = Sh::BN;
    auto As = rvc_stages_a<BM>();
    auto Bs = rvc_stages_b<BM>();
    const int tx = threadIdx.x % Sh::TX, ty = threadIdx.x / Sh::TX;
    rvc_zero<BM>(acc);
    if (kbeg >= kend) return;  // block-uniform
    RvcTc<PREC, BM> tc;
    constexpr bool prepares = RvcPrepares<LB>::value;
    if constexpr (prepares) {
        lb.prepare(kbeg, kend);
        __syncthreads();
    }
    la.issue(As[0], kbeg, kend);
    lb.issue(Bs[0], kbeg, kend);
    rv_cp_async_commit();
    if constexpr (prepares) {
        if (kbeg + RVC_BK < kend) lb.prepare(kbeg + RVC_BK, kend);
    }
    int s = 0;
    for (int k0 = kbeg; k0 < kend; k0 += RVC_BK, s ^= 1) {
        rv_cp_async_wait<0>();
        __syncthreads();
        if (k0 + RVC_BK < kend) {
            la.issue(As[s ^ 1], k0 + RVC_BK, kend);
            lb.issue(Bs[s ^ 1], k0 + RVC_BK, kend);
        }
        rv_cp_async_commit();
        // The decode table of the slice after next takes the slot slice k0's issue read,
        // before this iteration's barrier.
        if constexpr (prepares) {
            if (k0 + 2 * RVC_BK < kend) lb.prepare(k0 + 2 * RVC_BK, kend);
        }
        if constexpr (PREC != RV_PREC_FP32) tc.step(&As[s][0][0], BM + RVC_PAD, &Bs[s][0][0], BN + RVC_PAD);
        else rvc_fma_slice<BM>(As[s], Bs[s], tx, ty, acc);
    }
    if constexpr (PREC != RV_PREC_FP32) {
        // The tensor cores' accumulators back to each thread's 8 x 8, through stage A (32 rows of
        // BN + PAD floats) a quarter of the tile at a time.
        constexpr int ROWS = 2 * RVC_BK;
        static_assert(BM == BN && BM % ROWS == 0, "stage A holds ROWS rows of the C tile");
        float* Cs = &As[0][0][0];
        for (int lo = 0; lo < BM; lo += ROWS) {
            __syncthreads();  // the stages (or the previous quarter) are read
            tc.spill_rows(Cs, BN + RVC_PAD, lo, lo + ROWS);
            __syncthreads();
#pragma unroll
            for (int i = 0; i < Sh::TM; ++i) {
                const int r = Sh::row(ty, i) - lo;
                if (r < 0 || r >= ROWS) continue;
#pragma unroll
                for (int j = 0; j < Sh::TN; ++j) acc[i][j] = Cs[r * (BN + RVC_PAD) + Sh::col(tx, j)];
            }
        }
    }
}

// Writes acc to an NCHW-shaped output out[n, m, p] = out[(n*M + m)*P + p],
// where GEMM column col = n*P + p (fwd: m = k, P = OH*OW; bwd_data: m = c,
// P = H*W). bias may be null; act (RV_ACT_*) is applied after the bias.
template <int BM>
__device__ __forceinline__ void rvc_store_nchw(float* __restrict__ out, const float* __restrict__ bias, int act,
                                               const RvcAcc<BM>& acc, int m0, int n0, int M, int ncols, int P) {
    using Sh = RvcShape<BM>;
    const int tx = threadIdx.x % Sh::TX, ty = threadIdx.x / Sh::TX;
    long long base[Sh::TN];
#pragma unroll
    for (int j = 0; j < Sh::TN; ++j) {
        const int col = n0 + Sh::col(tx, j);
        const int n = col / P, p = col - n * P;
        base[j] = col < ncols ? (long long)n * M * P + p : -1;
    }
#pragma unroll
    for (int i = 0; i < Sh::TM; ++i) {
        const int m = m0 + Sh::row(ty, i);
        if (m >= M) break;  // rows increase with i
        const float b = bias ? __ldg(bias + m) : 0.f;
#pragma unroll
        for (int j = 0; j < Sh::TN; ++j)
            if (base[j] >= 0) out[base[j] + (long long)m * P] = rv_act(act, acc[i][j] + b);
    }
}

// ------------------------------------------------------------------ forward
// A[k, kred] = w[k*CRS + kred]  (k-walk: contiguous along kred)
template <int ROWS>
struct RvcWeightRowsA {
    static constexpr int E = ROWS / 16;
    const float* w;
    int M, ld, m0;
    // f(j, address, in range) for this thread's elements of the slice at k0.
    // (v5's issue; fetch keeps its own form, whose register allocation v4 was tuned on.)
    template <class F>
    __device__ __forceinline__ void walk(int k0, int kend, F f) const {
        const int kr = k0 + threadIdx.x % RVC_BK, m = m0 + threadIdx.x / RVC_BK;
        // Element j is 16 rows further: one address per slice, then a constant stride.
        const float* src = w + (long long)m * ld + kr;
        const long long step = 16LL * ld;
        const bool in = kr < kend;
#pragma unroll
        for (int j = 0; j < E; ++j) f(j, src + j * step, in && m + 16 * j < M);
    }
    __device__ __forceinline__ void fetch(int k0, int kend, float (&v)[E]) const {
        const int kr = k0 + threadIdx.x % RVC_BK;
#pragma unroll
        for (int j = 0; j < E; ++j) {
            const int m = m0 + threadIdx.x / RVC_BK + 16 * j;
            v[j] = (kr < kend && m < M) ? __ldg(w + (long long)m * ld + kr) : 0.f;
        }
    }
    __device__ __forceinline__ void store(RvcRow<ROWS>* S, const float (&v)[E]) const { rvc_store_kwalk<ROWS>(S, v); }
    __device__ __forceinline__ void issue(RvcRow<ROWS>* S, int k0, int kend) const {
        walk(k0, kend, [&](int j, const float* p, bool ok) { rv_cp_async<4>(rvc_kwalk_dst<ROWS>(S, j), ok ? p : w, ok ? 4 : 0); });
    }
};

// B[kred=(c,r,s), col=(n,oy,ox)] = x[n, c, oy*stride-pad+r, ox*stride-pad+s]
// (row-walk: consecutive threads take consecutive output pixels).
template <int ROWS>
struct RvcFwdB {
    static constexpr int E = ROWS / 16;
    const float* xn;  // x + n*C*H*W for this thread's column; null past the last column
    int iy0, ix0;     // oy*stride - pad, ox*stride - pad
    int H, W, R, S, RS;
    __device__ __forceinline__ void fetch(int k0, int kend, float (&v)[E]) const {
        const int kr = k0 + E * (threadIdx.x / ROWS);
        int c = kr / RS, rs = kr - c * RS;
        int r = rs / S, s = rs - r * S;
#pragma unroll
        for (int j = 0; j < E; ++j) {
            const int iy = iy0 + r, ix = ix0 + s;
            float val = 0.f;
            if (xn && kr + j < kend && (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W)
                val = __ldg(xn + (c * H + iy) * W + ix);
            v[j] = val;
            rvc_step_crs(c, r, s, R, S);
        }
    }
    __device__ __forceinline__ void store(RvcRow<ROWS>* S_, const float (&v)[E]) const {
        rvc_store_rowwalk<ROWS>(S_, v);
    }
};

// v4's B loader of the forward and (stride 1) backward-data passes: RvcFwdB / RvcBwdDataB, but
// the decode of a slice's 16 reduction indices (c, r, s) is made once per block, by 16 threads,
// into a shared table (prepare), where those have every thread divide twice and step a carry
// chain per element (about a third of v4's main loop went to that). An entry holds the index's
// offset in the source image, (c*Hs + SIGN*r)*Ws + SIGN*s, and r | s << 16 (r = s = 0xffff past
// the reduction: out of every image), so an element costs its bounds checks and one add. The
// tap of column (y0, x0) is pixel (y0 + SIGN*r, x0 + SIGN*s) of a Hs x Ws image:
//   forward (SIGN = 1):        x[n, c, oy*stride - pad + r, ox*stride - pad + s];
//   backward data (SIGN = -1): dy[n, k, iy + pad - r, ix + pad - s] (stride 1 only).
// Two tables alternate by slice parity: the next slice is decoded while this one is fetched.
// Needs R, S, Hs, Ws <= 32767 (the kernels trap otherwise).
// x0 of a column past the last: every tap's x lands far outside the image (and y0 * Ws + x0
// stays an int). Not Hs = 0: the 16 threads that fill the table read Hs and Ws.
#define RVC_DEAD_X (-(1 << 30))
template <int BN, int WHICH>
__device__ __forceinline__ int* rvc_tap_table() {
    ROTVAR_SHARED(int, table, [2 * RVC_BK]);
    return table;
}
template <int ROWS, int SIGN>
struct RvcTapB {
    static constexpr int E = ROWS / 16;
    static constexpr bool kPrepares = true;
    static_assert(E % 4 == 0 && (SIGN == 1 || SIGN == -1), "whole int4 table reads");
    const float* src;  // the column's image (c = 0); past the last column any image, x0 = RVC_DEAD_X
    int y0, x0, Hs, Ws, R, S, RS;
    RvcDivisor RSd{1}, Sd{1};
    __device__ __forceinline__ void init(const float* src_, int y0_, int x0_, int Hs_, int Ws_, int R_, int S_) {
        src = src_, y0 = y0_, x0 = x0_, Hs = Hs_, Ws = Ws_, R = R_, S = S_, RS = R_ * S_;
        RSd = RvcDivisor(RS), Sd = RvcDivisor(S_);
    }
    __device__ __forceinline__ void prepare(int k0, int kend) const {
        if (threadIdx.x < RVC_BK) {
            const int kr = k0 + threadIdx.x, slot = ((k0 / RVC_BK) & 1) * RVC_BK + threadIdx.x;
            const int c = RSd.div(kr), rs = kr - c * RS, r = Sd.div(rs), s = rs - r * S;
            rvc_tap_table<ROWS, 0>()[slot] = (c * Hs + SIGN * r) * Ws + SIGN * s;
            rvc_tap_table<ROWS, 1>()[slot] = kr < kend ? r | s << 16 : -1;
        }
    }
    // f(j, address, in range): the address is the image's first element where the tap misses.
    template <class F>
    __device__ __forceinline__ void walk(int k0, F f) const {
        const int j0 = ((k0 / RVC_BK) & 1) * RVC_BK + E * (threadIdx.x / ROWS);
        const int* off = rvc_tap_table<ROWS, 0>() + j0;
        const int* rsv = rvc_tap_table<ROWS, 1>() + j0;
        const int base = y0 * Ws + x0;
#pragma unroll
        for (int q = 0; q < E / 4; ++q) {
            const int4 o4 = *reinterpret_cast<const int4*>(off + 4 * q);
            const int4 p4 = *reinterpret_cast<const int4*>(rsv + 4 * q);
            const int o[4] = {o4.x, o4.y, o4.z, o4.w};
            const unsigned pr[4] = {(unsigned)p4.x, (unsigned)p4.y, (unsigned)p4.z, (unsigned)p4.w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int iy = y0 + SIGN * (int)(pr[u] & 0xffff), ix = x0 + SIGN * (int)(pr[u] >> 16);
                const bool ok = (unsigned)iy < (unsigned)Hs && (unsigned)ix < (unsigned)Ws;
                // A 32-bit unsigned offset.
                f(4 * q + u, src + (ok ? (unsigned)(o[u] + base) : 0u), ok);
            }
        }
    }
    __device__ __forceinline__ void fetch(int k0, int kend, float (&v)[E]) const {
        const int j0 = ((k0 / RVC_BK) & 1) * RVC_BK + E * (threadIdx.x / ROWS);
        const int* off = rvc_tap_table<ROWS, 0>() + j0;
        const int* rsv = rvc_tap_table<ROWS, 1>() + j0;
        const int base = y0 * Ws + x0;
#pragma unroll
        for (int q = 0; q < E / 4; ++q) {
            const int4 o4 = *reinterpret_cast<const int4*>(off + 4 * q);
            const int4 p4 = *reinterpret_cast<const int4*>(rsv + 4 * q);
            const int o[4] = {o4.x, o4.y, o4.z, o4.w};
            const unsigned pr[4] = {(unsigned)p4.x, (unsigned)p4.y, (unsigned)p4.z, (unsigned)p4.w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int iy = y0 + SIGN * (int)(pr[u] & 0xffff), ix = x0 + SIGN * (int)(pr[u] >> 16);
                const bool ok = (unsigned)iy < (unsigned)Hs && (unsigned)ix < (unsigned)Ws;
                // Load unconditionally (the image's first element where the tap misses) and select:
                // no branch around each load, and a 32-bit unsigned offset.
                const float val = __ldg(src + (ok ? (unsigned)(o[u] + base) : 0u));
                v[4 * q + u] = ok ? val : 0.f;
            }
        }
    }
    __device__ __forceinline__ void store(RvcRow<ROWS>* S_, const float (&v)[E]) const {
        rvc_store_rowwalk<ROWS>(S_, v);
    }
    __device__ __forceinline__ void issue(RvcRow<ROWS>* S_, int k0, int) const {
        walk(k0, [&](int j, const float* p, bool ok) { rv_cp_async<4>(rvc_rowwalk_dst<ROWS>(S_, j), p, ok ? 4 : 0); });
    }
};
// The B loaders of a BM-row tile: v4 (BM = 128) decodes through the table, the others per
// thread (32 x 128 has BN = 128 too: the key is BM).
template <int BM>
struct RvcFwdLoaderB {
    using T = RvcFwdB<RvcShape<BM>::BN>;
};
template <>
struct RvcFwdLoaderB<128> {
    using T = RvcTapB<128, 1>;
};

// y = act(conv(x, w) + bias). GEMM M = K, Ncols = N*OH*OW, Kred = C*R*S.
// The epilogue is fused into the store: bias (nullable) and the activation
// (RV_ACT_*: a conv followed by a ReLU writes its output once instead of
// writing, re-reading and rewriting it), so training never materializes the
// pre-activation.
template <int BM, int PREC = RV_PREC_FP32, bool ASYNC = false>
__device__ __forceinline__ void rvc_conv_fwd(float* y, const float* x, const float* w, const float* bias, int N, int C,
                                             int H, int W, int K, int R, int S, int stride, int pad, int OH, int OW,
                                             int act) {
    constexpr int BN = RvcShape<BM>::BN;
    if (blockDim.x != RVC_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    const int P = OH * OW, ncols = N * P, crs = C * R * S;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    RvcWeightRowsA<BM> la{w, K, crs, m0};
    typename RvcFwdLoaderB<BM>::T lb;
    {
        const int col = n0 + threadIdx.x % BN;
        const int n = col / P, p = col - n * P, oy = p / OW, ox = p - oy * OW;
        const float* xn = col < ncols ? x + (long long)n * C * H * W : nullptr;
        if constexpr (RvcPrepares<decltype(lb)>::value) {
            // The table packs r | s << 16, and 0xffff must fall outside every image.
            if (R > 0x7fff || S > 0x7fff || H > 0x7fff || W > 0x7fff) __trap();
            lb.init(xn ? xn : x, oy * stride - pad, xn ? ox * stride - pad : RVC_DEAD_X, H, W, R, S);
        } else {
            lb.xn = xn;
            lb.iy0 = oy * stride - pad;
            lb.ix0 = ox * stride - pad;
            lb.H = H, lb.W = W, lb.R = R, lb.S = S, lb.RS = R * S;
        }
    }
    RvcAcc<BM> acc;
    if constexpr (ASYNC) rvc_mainloop_async<BM, PREC>(la, lb, 0, crs, acc);
    else rvc_mainloop<BM, PREC>(la, lb, 0, crs, acc);
    rvc_store_nchw<BM>(y, bias, act, acc, m0, n0, K, ncols, P);
}


// ------------------------------------------------------------ backward data
// A[c, kred=(k,rs)] = w[(k*C + c)*RS + rs]  (k-walk: contiguous runs of RS)
template <int ROWS>
struct RvcBwdDataA {
    static constexpr int E = ROWS / 16;
    const float* w;
    int C, RS, m0;
    RvcDivisor RSd;
    template <class F>
    __device__ __forceinline__ void walk(int k0, int kend, F f) const {
        const int kr = k0 + threadIdx.x % RVC_BK;
        const int k = RSd.div(kr), rs = kr - k * RS, c = m0 + threadIdx.x / RVC_BK;
        // Element j is 16 channels further: one address per slice, then a constant stride.
        const float* src = w + ((long long)k * C + c) * RS + rs;
        const long long step = 16LL * RS;
        const bool in = kr < kend;
#pragma unroll
        for (int j = 0; j < E; ++j) f(j, src + j * step, in && c + 16 * j < C);
    }
    __device__ __forceinline__ void fetch(int k0, int kend, float (&v)[E]) const {
        const int kr = k0 + threadIdx.x % RVC_BK;
        const int k = RSd.div(kr), rs = kr - k * RS, c = m0 + threadIdx.x / RVC_BK;
        // Element j is 16 channels further: one address per slice, then a constant stride.
        const float* src = w + ((long long)k * C + c) * RS + rs;
        const long long step = 16LL * RS;
        const bool in = kr < kend;
#pragma unroll
        for (int j = 0; j < E; ++j) v[j] = (in && c + 16 * j < C) ? __ldg(src + j * step) : 0.f;
    }
    __device__ __forceinline__ void store(RvcRow<ROWS>* S, const float (&v)[E]) const { rvc_store_kwalk<ROWS>(S, v); }
    __device__ __forceinline__ void issue(RvcRow<ROWS>* S, int k0, int kend) const {
        walk(k0, kend, [&](int j, const float* p, bool ok) { rv_cp_async<4>(rvc_kwalk_dst<ROWS>(S, j), ok ? p : w, ok ? 4 : 0); });
    }
};

// B[kred=(k,r,s), col=(n,iy,ix)] = dy[n, k, oy, ox] where iy = oy*stride-pad+r,
// ix = ox*stride-pad+s; 0 when no such in-range (oy, ox) exists (for
// stride > 1 the (r, s) that do not divide evenly). Row-walk.
template <int ROWS>
struct RvcBwdDataB {
    static constexpr int E = ROWS / 16;
    const float* dyn;  // dy + n*K*OH*OW; null past the last column
    int ty0, tx0;      // iy + pad, ix + pad
    int OH, OW, R, S, RS, stride;
    __device__ __forceinline__ void fetch(int k0, int kend, float (&v)[E]) const {
        const int kr = k0 + E * (threadIdx.x / ROWS);
        int k = kr / RS, rs = kr - k * RS;
        int r = rs / S, s = rs - r * S;
#pragma unroll
        for (int j = 0; j < E; ++j) {
            int oy = ty0 - r, ox = tx0 - s;
            bool ok = dyn && kr + j < kend;
            if (stride != 1) {  // block-uniform branch; stride 1 needs no division
                ok = ok && oy >= 0 && ox >= 0 && oy % stride == 0 && ox % stride == 0;
                oy /= stride;
                ox /= stride;
            }
            ok = ok && (unsigned)oy < (unsigned)OH && (unsigned)ox < (unsigned)OW;
            v[j] = ok ? __ldg(dyn + (k * OH + oy) * OW + ox) : 0.f;
            rvc_step_crs(k, r, s, R, S);
        }
    }
    __device__ __forceinline__ void store(RvcRow<ROWS>* S_, const float (&v)[E]) const {
        rvc_store_rowwalk<ROWS>(S_, v);
    }
};

template <int BM>
struct RvcBwdDataLoaderB {
    using T = RvcBwdDataB<RvcShape<BM>::BN>;
};
template <>
struct RvcBwdDataLoaderB<128> {
    using T = RvcTapB<128, -1>;
};

// Gather form (each dx element owned by one thread, no atomics, no zeroing
// pass). For stride > 1 the (r, s) taps that do not land on an output pixel
// are loaded as zeros, i.e. ~(1 - 1/stride^2) of the FMAs are wasted; v3
// below avoids that with a per-phase (sub-pixel) decomposition.
// dx = conv_transpose(dy, w) as a gather: GEMM M = C, Ncols = N*H*W,
// Kred = K*R*S. Every dx element is written exactly once (no atomics, dx
// need not be zeroed).
template <int BM, int PREC = RV_PREC_FP32, bool ASYNC = false>
__device__ __forceinline__ void rvc_conv_bwd_data(float* dx, const float* dy, const float* w, int N, int C, int H,
                                                  int W, int K, int R, int S, int stride, int pad, int OH, int OW) {
    constexpr int BN = RvcShape<BM>::BN;
    if (blockDim.x != RVC_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    const int HW = H * W, ncols = N * HW, krs = K * R * S;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    RvcBwdDataA<BM> la{w, C, R * S, m0, RvcDivisor(R * S)};
    typename RvcBwdDataLoaderB<BM>::T lb;
    {
        const int col = n0 + threadIdx.x % BN;
        const int n = col / HW, q = col - n * HW, iy = q / W, ix = q - iy * W;
        const float* dyn = col < ncols ? dy + (long long)n * K * OH * OW : nullptr;
        if constexpr (RvcPrepares<decltype(lb)>::value) {
            if (stride != 1 || R > 0x7fff || S > 0x7fff || OH > 0x7fff || OW > 0x7fff) __trap();
            lb.init(dyn ? dyn : dy, iy + pad, dyn ? ix + pad : RVC_DEAD_X, OH, OW, R, S);
        } else {
            lb.dyn = dyn;
            lb.ty0 = iy + pad;
            lb.tx0 = ix + pad;
            lb.OH = OH, lb.OW = OW, lb.R = R, lb.S = S, lb.RS = R * S, lb.stride = stride;
        }
    }
    RvcAcc<BM> acc;
    if constexpr (ASYNC) rvc_mainloop_async<BM, PREC>(la, lb, 0, krs, acc);
    else rvc_mainloop<BM, PREC>(la, lb, 0, krs, acc);
    rvc_store_nchw<BM>(dx, nullptr, RV_ACT_IDENTITY, acc, m0, n0, C, ncols, HW);
}


// -------------------------------------------- backward data, strided: v3
// variant v3 (stride > 1): the sub-pixel (phase) decomposition v1 lacks. dx
// pixel (iy, ix) receives tap (r, s) only if (iy + pad - r) and (ix + pad - s)
// are multiples of the stride, i.e. r = qy (mod stride) with
// qy = (iy + pad) mod stride (same for x). So the pixels split into stride^2
// phases (qy, qx) (grid.z), each a GEMM over only its valid taps:
//   M = C, Ncols = N * Hq * Wq (the phase's pixels iy = iy0 + stride*ty with
//   iy0 = (qy - pad) mod stride, Hq = ceil((H - iy0) / stride)),
//   Kred = K * Ry * Sx (r = qy + stride*tr, tr < Ry = ceil((R - qy) / stride)).
// v1 loads a zero for every tap that misses (3/4 of its FMAs at stride 2);
// here none is. A phase with no taps (1x1 kernels at stride 2: 3 of 4
// phases) writes zeros. The nonzero products are summed in v1's order.
// Launch: block 256, grid = (ceil(N*ceil(H/stride)*ceil(W/stride) / 64),
// ceil(C / 64), stride*stride); blocks past their phase's columns exit.
struct RvcPhase {
    int qy, qx, iy0, ix0, Hq, Wq, Ry, Sx;
    __device__ RvcPhase(int ph, int stride, int pad, int H, int W, int R, int S) {
        qy = ph / stride;
        qx = ph % stride;
        iy0 = ((qy - pad) % stride + stride) % stride;
        ix0 = ((qx - pad) % stride + stride) % stride;
        Hq = iy0 < H ? (H - iy0 + stride - 1) / stride : 0;
        Wq = ix0 < W ? (W - ix0 + stride - 1) / stride : 0;
        Ry = qy < R ? (R - qy + stride - 1) / stride : 0;
        Sx = qx < S ? (S - qx + stride - 1) / stride : 0;
    }
};

// A[c, kred=(k,tr,ts)] = w[k, c, qy + stride*tr, qx + stride*ts]  (k-walk)
struct RvcBwdDataPhaseA {
    static constexpr int E = 4;
    const float* w;
    int C, R, S, RySx, Sx, qy, qx, stride, m0;
    __device__ __forceinline__ void fetch(int k0, int kend, float (&v)[E]) const {
        const int kr = k0 + threadIdx.x % RVC_BK;
        const int k = kr / RySx, t = kr - k * RySx, tr = t / Sx, ts = t - tr * Sx;
        const int r = qy + stride * tr, s = qx + stride * ts;
#pragma unroll
        for (int j = 0; j < E; ++j) {
            const int c = m0 + threadIdx.x / RVC_BK + 16 * j;
            v[j] = (kr < kend && c < C) ? __ldg(w + (((long long)k * C + c) * R + r) * S + s) : 0.f;
        }
    }
    __device__ __forceinline__ void store(RvcRow<64>* S_, const float (&v)[E]) const { rvc_store_kwalk<64>(S_, v); }
};

// B[kred=(k,tr,ts), col=(n,ty,tx)] = dy[n, k, oy0 - tr, ox0 - ts] with
// oy0 = (iy + pad - qy) / stride (exact) for iy = iy0 + stride*ty; 0 out of
// range. Row-walk: consecutive threads take consecutive phase pixels.
struct RvcBwdDataPhaseB {
    static constexpr int E = 4;
    const float* dyn;  // dy + n*K*OH*OW; null past the phase's last column
    int oy0, ox0, OH, OW, Ry, Sx, RySx;
    __device__ __forceinline__ void fetch(int k0, int kend, float (&v)[E]) const {
        const int kr = k0 + E * (threadIdx.x / 64);
        int k = kr / RySx, t = kr - k * RySx, tr = t / Sx, ts = t - tr * Sx;
#pragma unroll
        for (int j = 0; j < E; ++j) {
            const int oy = oy0 - tr, ox = ox0 - ts;
            const bool ok = dyn && kr + j < kend && (unsigned)oy < (unsigned)OH && (unsigned)ox < (unsigned)OW;
            v[j] = ok ? __ldg(dyn + (k * OH + oy) * OW + ox) : 0.f;
            if (++ts == Sx) {
                ts = 0;
                if (++tr == Ry) {
                    tr = 0;
                    ++k;
                }
            }
        }
    }
    __device__ __forceinline__ void store(RvcRow<64>* S_, const float (&v)[E]) const {
        rvc_store_rowwalk<64>(S_, v);
    }
};

template <int PREC = RV_PREC_FP32>
__device__ __forceinline__ void rvc_conv_bwd_data_phase(float* dx, const float* dy, const float* w, int N, int C,
                                                        int H, int W, int K, int R, int S, int stride, int pad,
                                                        int OH, int OW) {
    if (blockDim.x != RVC_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    if ((int)gridDim.z != stride * stride) __trap();
    const RvcPhase ph(blockIdx.z, stride, pad, H, W, R, S);
    const int PQ = ph.Hq * ph.Wq, ncols = N * PQ, krs = K * ph.Ry * ph.Sx;
    const int m0 = blockIdx.y * 64, n0 = blockIdx.x * 64;
    if (n0 >= ncols) return;  // block-uniform: this phase has fewer pixels than the grid covers

    RvcBwdDataPhaseA la{w, C, R, S, ph.Ry * ph.Sx, ph.Sx, ph.qy, ph.qx, stride, m0};
    RvcBwdDataPhaseB lb;
    {
        const int col = n0 + threadIdx.x % 64;
        const int n = col / PQ, q = col - n * PQ, ty = q / ph.Wq, tx = q - ty * ph.Wq;
        lb.dyn = col < ncols ? dy + (long long)n * K * OH * OW : nullptr;
        lb.oy0 = (ph.iy0 + stride * ty + pad - ph.qy) / stride;
        lb.ox0 = (ph.ix0 + stride * tx + pad - ph.qx) / stride;
        lb.OH = OH, lb.OW = OW, lb.Ry = ph.Ry, lb.Sx = ph.Sx, lb.RySx = ph.Ry * ph.Sx;
    }
    RvcAcc<64> acc;
    rvc_mainloop<64, PREC>(la, lb, 0, krs, acc);

    // dx[n, c, iy0 + stride*ty, ix0 + stride*tx]
    const int tx4 = threadIdx.x % (64 / RVC_TN), ty4 = threadIdx.x / (64 / RVC_TN);
    long long base[RVC_TN];
#pragma unroll
    for (int j = 0; j < RVC_TN; ++j) {
        const int col = n0 + tx4 * RVC_TN + j;
        const int n = col / PQ, q = col - n * PQ, ty = q / ph.Wq, tx = q - ty * ph.Wq;
        base[j] = col < ncols ? (long long)n * C * H * W + (ph.iy0 + stride * ty) * W + ph.ix0 + stride * tx : -1;
    }
#pragma unroll
    for (int i = 0; i < RVC_TM; ++i) {
        const int c = m0 + ty4 * RVC_TM + i;
        if (c >= C) break;
#pragma unroll
        for (int j = 0; j < RVC_TN; ++j)
            if (base[j] >= 0) dx[base[j] + (long long)c * H * W] = acc[i][j];
    }
}


// ---------------------------------------------------------- backward weight
// A[k, kred=(n,p)] = dy[(n*K + k)*P + p]  (k-walk: contiguous along p)
template <int ROWS>
struct RvcBwdWeightA {
    static constexpr int E = ROWS / 16;
    const float* dy;
    int K, P, m0;
    RvcDivisor Pd;
    template <class F>
    __device__ __forceinline__ void walk(int k0, int kend, F f) const {
        const int kr = k0 + threadIdx.x % RVC_BK;
        const int n = Pd.div(kr), p = kr - n * P, k = m0 + threadIdx.x / RVC_BK;
        // Element j is 16 rows further: one address per slice, then a constant stride (the
        // per-element 64-bit index took about a tenth of v4's main loop).
        const float* src = dy + ((long long)n * K + k) * P + p;
        const long long step = 16LL * P;
        const bool in = kr < kend;
#pragma unroll
        for (int j = 0; j < E; ++j) f(j, src + j * step, in && k + 16 * j < K);
    }
    __device__ __forceinline__ void fetch(int k0, int kend, float (&v)[E]) const {
        const int kr = k0 + threadIdx.x % RVC_BK;
        const int n = Pd.div(kr), p = kr - n * P, k = m0 + threadIdx.x / RVC_BK;
        // Element j is 16 rows further: one address per slice, then a constant stride (the
        // per-element 64-bit index took about a tenth of v4's main loop).
        const float* src = dy + ((long long)n * K + k) * P + p;
        const long long step = 16LL * P;
        const bool in = kr < kend;
#pragma unroll
        for (int j = 0; j < E; ++j) v[j] = (in && k + 16 * j < K) ? __ldg(src + j * step) : 0.f;
    }
    __device__ __forceinline__ void store(RvcRow<ROWS>* S, const float (&v)[E]) const { rvc_store_kwalk<ROWS>(S, v); }
    __device__ __forceinline__ void issue(RvcRow<ROWS>* S, int k0, int kend) const {
        walk(k0, kend, [&](int j, const float* q, bool ok) { rv_cp_async<4>(rvc_kwalk_dst<ROWS>(S, j), ok ? q : dy, ok ? 4 : 0); });
    }
};

// B[kred=(n,oy,ox), col=(c,r,s)] = x[n, c, oy*stride-pad+r, ox*stride-pad+s].
// k-walk along the reduction (consecutive threads: consecutive ox, so x reads
// are coalesced); a thread's E columns are E adjacent ones, E*(t/16) + j.
// Each column's decode (its offset in an image of x, and its r, s) is made
// once per block into a shared table, which fetch reads four columns at a
// time. Held in registers, the 16 x 256 tile's 48 decoded values kept that
// kernel at 127 registers, 2 blocks per SM. The E values of a fetch go to the
// shared tile as float4s.
template <int ROWS, bool SELECT = true>
struct RvcBwdWeightB {
    static constexpr int E = ROWS / 16;
    static_assert(E % 4 == 0, "whole int4 / float4 accesses");
    const float* x;
    const int* off;  // shared, per tile column: c*H*W + r*W + s
    const int* rs;   // shared, per tile column: r | s << 16; -1 past C*R*S
    int C, H, W, P, OW, stride, pad;
    RvcDivisor Pd, OWd;
    // f(j, image, offset of the tap in it, in range).
    template <class F>
    __device__ __forceinline__ void walk(int k0, int kend, F f) const {
        const int kr = k0 + threadIdx.x % RVC_BK;
        const int n = Pd.div(kr), p = kr - n * P, oy = OWd.div(p), ox = p - oy * OW;
        const int iyb = oy * stride - pad, ixb = ox * stride - pad, base = iyb * W + ixb;
        const bool in = kr < kend;
        const float* xn = x + (long long)(in ? n : 0) * C * H * W;  // past kend, n may be N
        const int j0 = E * (threadIdx.x / RVC_BK);
#pragma unroll
        for (int q = 0; q < E / 4; ++q) {
            const int4 o4 = *reinterpret_cast<const int4*>(off + j0 + 4 * q);
            const int4 p4 = *reinterpret_cast<const int4*>(rs + j0 + 4 * q);
            const int o[4] = {o4.x, o4.y, o4.z, o4.w}, pr[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int iy = iyb + (pr[u] & 0xffff), ix = ixb + (pr[u] >> 16);
                f(4 * q + u, xn, o[u] + base,
                  in && pr[u] >= 0 && (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W);
            }
        }
    }
    __device__ __forceinline__ void fetch(int k0, int kend, float (&v)[E]) const {
        const int kr = k0 + threadIdx.x % RVC_BK;
        const int n = Pd.div(kr), p = kr - n * P, oy = OWd.div(p), ox = p - oy * OW;
        const int iyb = oy * stride - pad, ixb = ox * stride - pad, base = iyb * W + ixb;
        const bool in = kr < kend;
        const float* xn = x + (long long)(in ? n : 0) * C * H * W;  // past kend, n may be N
        const int j0 = E * (threadIdx.x / RVC_BK);
#pragma unroll
        for (int q = 0; q < E / 4; ++q) {
            const int4 o4 = *reinterpret_cast<const int4*>(off + j0 + 4 * q);
            const int4 p4 = *reinterpret_cast<const int4*>(rs + j0 + 4 * q);
            const int o[4] = {o4.x, o4.y, o4.z, o4.w}, pr[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int iy = iyb + (pr[u] & 0xffff), ix = ixb + (pr[u] >> 16);
                const bool ok = in && pr[u] >= 0 && (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W;
                // SELECT: an unconditional load (of the image's first value where the tap is
                // outside) lets the compiler issue it without a branch around it; it costs a
                // register, which the tensor-core kernels (80) do not have.
                if constexpr (SELECT) {
                    const float t = __ldg(xn + (ok ? o[u] + base : 0));
                    v[4 * q + u] = ok ? t : 0.f;
                } else {
                    v[4 * q + u] = ok ? __ldg(xn + (o[u] + base)) : 0.f;
                }
            }
        }
    }
    __device__ __forceinline__ void issue(RvcRow<ROWS>* S_, int k0, int kend) const {
        float* row = &S_[threadIdx.x % RVC_BK][E * (threadIdx.x / RVC_BK)];
        walk(k0, kend, [&](int j, const float* xn, int o, bool ok) { rv_cp_async<4>(row + j, xn + (ok ? o : 0), ok ? 4 : 0); });
    }
    __device__ __forceinline__ void store(RvcRow<ROWS>* S_, const float (&v)[E]) const {
        float4* row = reinterpret_cast<float4*>(&S_[threadIdx.x % RVC_BK][E * (threadIdx.x / RVC_BK)]);
#pragma unroll
        for (int q = 0; q < E / 4; ++q) row[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    }
};

// The column tables of RvcBwdWeightB (WHICH 0: offsets, 1: r | s << 16), in a function of BN
// alone for the reason rvc_tile_a gives.
template <int BN, int WHICH>
__device__ __forceinline__ int* rvc_col_table() {
    ROTVAR_SHARED(int, table, [BN]);
    return table;
}

// split-K over the long N*OH*OW reduction because M x Ncols = K x CRS is
// often only a few tiles; fixed contiguous ranges + an ordered sum
// (sum_partials_f32) instead of atomics keep dW bit-reproducible.
// partial[z][k][crs] = sum over kred in split z's range of dy * x. GEMM M = K,
// Ncols = C*R*S, Kred = N*OH*OW split into `splits` (= gridDim.z) contiguous
// ranges of chunk = roundup(ceil(Kred / splits), 16) steps; split z covers
// [z*chunk, min((z+1)*chunk, Kred)) and writes zeros if that is empty.
template <int BM, int PREC = RV_PREC_FP32, bool ASYNC = false>
__device__ __forceinline__ void rvc_conv_bwd_weight(float* partial, const float* x, const float* dy, int N, int C,
                                                    int H, int W, int K, int R, int S, int stride, int pad, int OH,
                                                    int OW, int splits) {
    constexpr int BN = RvcShape<BM>::BN;
    if (blockDim.x != RVC_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    if (splits < 1 || (int)gridDim.z != splits) __trap();
    if (R > 0x7fff || S > 0x7fff) __trap();  // r | s << 16 in the column table
    const int P = OH * OW, kred = N * P, RS = R * S, crs = C * RS;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int chunk = ((kred + splits - 1) / splits + RVC_BK - 1) / RVC_BK * RVC_BK;
    const long long kb = (long long)blockIdx.z * chunk;  // may pass Kred for trailing splits
    const int kbeg = (int)(kb < kred ? kb : kred);
    const int kend = kbeg + chunk < kred ? kbeg + chunk : kred;

    const RvcDivisor Pd(P), OWd(OW);
    RvcBwdWeightA<BM> la{dy, K, P, m0, Pd};
    // The B loader's column table (see RvcBwdWeightB); r and s share one int.
    int* col_off = rvc_col_table<BN, 0>();
    int* col_rs = rvc_col_table<BN, 1>();
    for (int j = threadIdx.x; j < BN; j += RVC_THREADS) {
        const int col = n0 + j, c = col / RS, rs = col - c * RS, r = rs / S;
        col_off[j] = c * H * W + r * W + (rs - r * S);
        col_rs[j] = col < crs ? r | (rs - r * S) << 16 : -1;
    }
    __syncthreads();
    const RvcBwdWeightB<BN, PREC == RV_PREC_FP32> lb{x, col_off, col_rs, C, H, W, P, OW, stride, pad, Pd, OWd};

    RvcAcc<BM> acc;
    if constexpr (ASYNC) rvc_mainloop_async<BM, PREC>(la, lb, kbeg, kend, acc);
    else rvc_mainloop<BM, PREC>(la, lb, kbeg, kend, acc);

    using Sh = RvcShape<BM>;
    const int tx = threadIdx.x % Sh::TX, ty = threadIdx.x / Sh::TX;
    float* out = partial + (long long)blockIdx.z * K * crs;
#pragma unroll
    for (int i = 0; i < Sh::TM; ++i) {
        const int m = m0 + Sh::row(ty, i);
        if (m >= K) break;
#pragma unroll
        for (int j = 0; j < Sh::TN; ++j) {
            const int col = n0 + Sh::col(tx, j);
            if (col < crs) out[(long long)m * crs + col] = acc[i][j];
        }
    }
}
