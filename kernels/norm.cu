// Batch normalization over an NCHW tensor (HW = H*W) or an [N, C] matrix
// (HW = 1). Channel c's cnt = N*HW values sit at n*C*HW + c*HW + hw.
//
// Reductions (bn_stats, bn_bwd_reduce): one block per channel. A block's
// threads stride over the channel's flat index k = n*HW + hw, so every thread
// has work even when HW == 1. Each thread accumulates in double; the block
// then sums the partials with fixed warp butterflies and a warp-ordered final
// step, so results depend only on (N, C, HW, blockDim): deterministic, no
// atomics. Per-element arithmetic stays fp32 where the CPU backend does it in
// fp32 (x̂); the sums are f64 like the CPU's. The double accumulators cost a
// conversion and a DADD per element, far below what H100 FP64 sustains at
// memory bandwidth; in exchange the sums carry no fp32 accumulation error
// even over N*HW ~ 10^5..10^6 values.
//
// Variance is two-pass, mean first and then the mean of squared deviations
// from it (in double), never E[x²] − E[x]², which cancels catastrophically
// when |mean| >> std.
//
// Elementwise kernels (bn_apply, bn_eval, bn_bwd_apply) are flat grid-stride
// loops over all N*C*HW elements (coalesced for any HW); each thread tracks
// its (channel, hw) position incrementally, without a division per element.
#include "rotvar_common.cuh"

__device__ __forceinline__ double rv_norm_warp_sum(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Block-wide sums of a and b, returned in EVERY thread: every warp reduces the
// same 32 per-warp partials in the same order, and a xor butterfly gives all
// lanes the same bits. blockDim.x must be a multiple of 32.
__device__ __forceinline__ void rv_norm_block_sum2(double& a, double& b) {
    ROTVAR_SHARED(double, sa, [32]);
    ROTVAR_SHARED(double, sb, [32]);
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    a = rv_norm_warp_sum(a);
    b = rv_norm_warp_sum(b);
    if (lane == 0) {
        sa[warp] = a;
        sb[warp] = b;
    }
    __syncthreads();
    a = rv_norm_warp_sum(lane < nwarps ? sa[lane] : 0.0);
    b = rv_norm_warp_sum(lane < nwarps ? sb[lane] : 0.0);
    // sa/sb are rewritten by the next call.
    __syncthreads();
}

// Calls f(offset) for this thread's share of channel c: flat channel indices
// k = threadIdx.x, threadIdx.x + blockDim.x, ... < N*HW, in increasing order.
template <class F>
__device__ __forceinline__ void rv_norm_channel_for(int N, int C, int HW, int c, F f) {
    if (HW <= 0) return;
    const long long cnt = (long long)N * HW, cs = (long long)C * HW;
    const int B = blockDim.x;
    const long long step = (long long)(B / HW) * cs + B % HW;  // offset step without an hw carry
    const int step_hw = B % HW;
    int hw = (int)(threadIdx.x % HW);
    long long off = (long long)(threadIdx.x / HW) * cs + (long long)c * HW + hw;
#pragma unroll 4
    for (long long k = threadIdx.x; k < cnt; k += B) {
        f(off);
        off += step;
        hw += step_hw;
        if (hw >= HW) {  // carry into the next sample: skip the other channels
            hw -= HW;
            off += cs - HW;
        }
    }
}

// Calls f(e, c) for every element e of the N*C*HW tensor in this thread's
// grid-stride share, with c = (e / HW) % C.
template <class F>
__device__ __forceinline__ void rv_norm_flat_for(int N, int C, int HW, F f) {
    const long long n = (long long)N * C * HW;
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (HW <= 0 || C <= 0 || e >= n) return;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int step_hw = (int)(stride % HW), step_c = (int)((stride / HW) % C);
    int hw = (int)(e % HW), c = (int)((e / HW) % C);
    for (; e < n; e += stride) {
        f(e, c);
        hw += step_hw;
        const int carry = hw >= HW;
        hw -= carry ? HW : 0;
        c += step_c + carry;  // < 2C, so one wrap suffices
        if (c >= C) c -= C;
    }
}

// Training-mode statistics of each channel over its cnt = N*HW values:
//   mean, var (biased) in double, two-pass;
//   save_mean = mean, save_invstd = 1/sqrt(var + eps)   (computed in double)
//   running_mean = (1-m)*running_mean + m*mean
//   running_var  = (1-m)*running_var  + m*var*cnt/(cnt-1)   (var when cnt == 1)
// The running updates are fp32 without FMA contraction, the CPU's arithmetic.
// x is read twice (the second pass mostly from L2).
// Launch: grid = C (one block per channel; a smaller grid is also correct,
// blocks stride over channels), block 1024 (any multiple of 32 up to 1024,
// else __trap; results depend on it only in the last bits), no dynamic shared
// memory.
extern "C" __global__ void __launch_bounds__(1024)
    bn_stats_f32(float* save_mean, float* save_invstd, float* running_mean, float* running_var, const float* x, int N,
                 int C, int HW, float momentum, float eps) {
    if ((blockDim.x & 31u) != 0) __trap();
    const long long cnt = (long long)N * HW;
    for (int c = blockIdx.x; c < C; c += gridDim.x) {
        double s = 0.0, unused = 0.0;
        rv_norm_channel_for(N, C, HW, c, [&](long long off) { s += (double)x[off]; });
        rv_norm_block_sum2(s, unused);
        const double mean = s / (double)cnt;
        double q = 0.0;
        rv_norm_channel_for(N, C, HW, c, [&](long long off) {
            const double d = (double)x[off] - mean;
            q += d * d;
        });
        rv_norm_block_sum2(q, unused);
        if (threadIdx.x == 0) {
            const double var = q / (double)cnt;
            const float mean_f = (float)mean;
            save_mean[c] = mean_f;
            save_invstd[c] = (float)(1.0 / sqrt(var + (double)eps));
            const double unbiased = cnt > 1 ? var * (double)cnt / (double)(cnt - 1) : var;
            const float keep = 1.0f - momentum;
            running_mean[c] = __fadd_rn(__fmul_rn(keep, running_mean[c]), __fmul_rn(momentum, mean_f));
            running_var[c] = __fadd_rn(__fmul_rn(keep, running_var[c]), __fmul_rn(momentum, (float)unbiased));
        }
    }
}

// y = act((x - mean[c]) * (gamma[c] * invstd[c]) + beta[c])   (training-mode
// output, from bn_stats' save_mean / save_invstd; act RV_ACT_*: a batch norm
// followed by a ReLU in one pass). y may alias x.
// Launch: block 256, grid = max(1, min(ceil(N*C*HW/256), 32*SMs)), no dynamic
// shared memory; any 1-D grid/block is correct.
extern "C" __global__ void bn_apply_f32(float* y, const float* x, const float* mean, const float* invstd,
                                        const float* gamma, const float* beta, int N, int C, int HW, int act) {
    rv_norm_flat_for(N, C, HW, [&](long long e, int c) {
        y[e] = rv_act(act, (x[e] - mean[c]) * (gamma[c] * invstd[c]) + beta[c]);
    });
}

// Inference mode: scale = gamma[c] / sqrtf(running_var[c] + eps) (IEEE sqrt and
// division, the CPU's bits); y = act((x - running_mean[c]) * scale + beta[c]).
// y may alias x.
// Launch: block 256, grid = max(1, min(ceil(N*C*HW/256), 32*SMs)), no dynamic
// shared memory; any 1-D grid/block is correct.
extern "C" __global__ void bn_eval_f32(float* y, const float* x, const float* running_mean, const float* running_var,
                                       const float* gamma, const float* beta, float eps, int N, int C, int HW,
                                       int act) {
    rv_norm_flat_for(N, C, HW, [&](long long e, int c) {
        const float scale = gamma[c] / sqrtf(running_var[c] + eps);
        y[e] = rv_act(act, (x[e] - running_mean[c]) * scale + beta[c]);
    });
}

// Per-channel parameter gradients of training-mode batch norm:
//   dbeta[c]  = sum dy
//   dgamma[c] = sum dy * xhat,  xhat = (x - mean[c]) * invstd[c]  (fp32, as on the CPU)
// Launch: grid = C (one block per channel; a smaller grid is also correct),
// block 1024 (any multiple of 32 up to 1024, else __trap), no dynamic shared
// memory.
extern "C" __global__ void __launch_bounds__(1024)
    bn_bwd_reduce_f32(float* dgamma, float* dbeta, const float* x, const float* dy, const float* mean,
                      const float* invstd, int N, int C, int HW) {
    if ((blockDim.x & 31u) != 0) __trap();
    for (int c = blockIdx.x; c < C; c += gridDim.x) {
        const float m = mean[c], is = invstd[c];
        double sdy = 0.0, sdyx = 0.0;
        rv_norm_channel_for(N, C, HW, c, [&](long long off) {
            const float d = dy[off];
            const float xhat = (x[off] - m) * is;
            sdy += (double)d;
            sdyx += (double)d * (double)xhat;  // exact product of two floats
        });
        rv_norm_block_sum2(sdy, sdyx);
        if (threadIdx.x == 0) {
            dbeta[c] = (float)sdy;
            dgamma[c] = (float)sdyx;
        }
    }
}

// Input gradient of training-mode batch norm, after bn_bwd_reduce:
//   dx = gamma[c]*invstd[c] * (dy - dbeta[c]/cnt - xhat*dgamma[c]/cnt),  cnt = N*HW
// (/cnt is a multiply by the fp32 reciprocal.) dx may alias dy.
// Launch: block 256, grid = max(1, min(ceil(N*C*HW/256), 32*SMs)), no dynamic
// shared memory; any 1-D grid/block is correct.
extern "C" __global__ void bn_bwd_apply_f32(float* dx, const float* x, const float* dy, const float* gamma,
                                            const float* mean, const float* invstd, const float* dgamma,
                                            const float* dbeta, int N, int C, int HW) {
    const float inv_cnt = 1.0f / (float)((long long)N * HW);
    rv_norm_flat_for(N, C, HW, [&](long long e, int c) {
        const float is = invstd[c];
        const float xhat = (x[e] - mean[c]) * is;
        dx[e] = (gamma[c] * is) * (dy[e] - dbeta[c] * inv_cnt - xhat * (dgamma[c] * inv_cnt));
    });
}
