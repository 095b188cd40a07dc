// Classification loss: log-softmax over rows and negative log-likelihood.
//
// Row kernels use one warp per row (rows are class scores, cols ~10..1000):
// lanes stride over the columns, so any cols works; warps stride over rows,
// so the grid need not cover them. Labels are class indices stored as float.
#include "rotvar_common.cuh"

__device__ __forceinline__ float rv_loss_warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

__device__ __forceinline__ double rv_loss_warp_sum_d(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Row r of the warp-per-row loop: warps stride over rows.
#define RV_LOSS_FOR_ROWS(r)                                                                                  \
    for (long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;            \
         r += (long long)gridDim.x * (blockDim.x >> 5))

// Class index `l` (stored as float) of a row, or -1 when it is not in [0, cols)
// (negative, too large, NaN). Fractional labels truncate, like the CPU's `as usize`.
__device__ __forceinline__ int rv_loss_label(float l, int cols) {
    return (l >= 0.0f && l < (float)cols) ? (int)l : -1;
}

// y[r, :] = x[r, :] - (max + log(sum(exp(x[r, :] - max)))); y may alias x.
// max ignores NaN (fmaxf, like the CPU's f32::max fold); a NaN still poisons
// the row through the sum, as on the CPU.
// Launch: block 256 (8 rows per block; any multiple of 32 up to 1024, else
// __trap), grid = ceil(rows / (block/32)) (a smaller grid is also correct), no
// dynamic shared memory.
extern "C" __global__ void log_softmax_fwd_f32(float* y, const float* x, int rows, int cols) {
    if ((blockDim.x & 31u) != 0) __trap();
    const int lane = threadIdx.x & 31;
    RV_LOSS_FOR_ROWS(r) {
        const float* xr = x + r * cols;
        float* yr = y + r * cols;
        float m = __int_as_float(0xff800000);  // -inf
        for (int j = lane; j < cols; j += 32) m = fmaxf(m, xr[j]);
        m = rv_loss_warp_max(m);
        float s = 0.0f;
        for (int j = lane; j < cols; j += 32) s += expf(xr[j] - m);
        s = rotvar_warp_sum(s);
        const float lse = m + logf(s);
        for (int j = lane; j < cols; j += 32) yr[j] = xr[j] - lse;
    }
}

// dx[r, j] = dy[r, j] - exp(y[r, j]) * sum_k dy[r, k], from the forward output
// y. dx may alias dy (every lane has read its dy before the warp sum).
// Launch: block 256 (any multiple of 32 up to 1024, else __trap), grid =
// ceil(rows / (block/32)) (a smaller grid is also correct), no dynamic shared
// memory.
extern "C" __global__ void log_softmax_bwd_f32(float* dx, const float* dy, const float* y, int rows, int cols) {
    if ((blockDim.x & 31u) != 0) __trap();
    const int lane = threadIdx.x & 31;
    RV_LOSS_FOR_ROWS(r) {
        const long long base = r * cols;
        float s = 0.0f;
        for (int j = lane; j < cols; j += 32) s += dy[base + j];
        s = rotvar_warp_sum(s);
        for (int j = lane; j < cols; j += 32) dx[base + j] = dy[base + j] - expf(y[base + j]) * s;
    }
}

// loss[0] = -(1/rows) * sum_i logp[i, labels[i]].
// Any label outside [0, cols) (or NaN) makes the loss NaN, so the trainer's
// non-finite check fires instead of the kernel reading out of bounds.
// variant: ONE block. Thread t adds rows t, t + blockDim, ... in double; the
// warp butterflies and the warp-ordered final sum are fixed, so the result
// depends only on (rows, blockDim): deterministic, no atomics.
// Launch: grid 1, block 256 (any multiple of 32 up to 1024, else __trap;
// blocks other than 0 do nothing), no dynamic shared memory.
extern "C" __global__ void __launch_bounds__(1024) nll_fwd_f32(float* loss, const float* logp, const float* labels,
                                                               int rows, int cols) {
    ROTVAR_SHARED(double, warp_sums, [32]);
    if ((blockDim.x & 31u) != 0) __trap();
    if (blockIdx.x != 0) return;
    const double nan = (double)__int_as_float(0x7fc00000);
    double acc = 0.0;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) {
        const int l = rv_loss_label(labels[i], cols);
        acc += l >= 0 ? (double)logp[(long long)i * cols + l] : nan;
    }
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    acc = rv_loss_warp_sum_d(acc);
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0.0;
        acc = rv_loss_warp_sum_d(acc);
        if (lane == 0) loss[0] = (float)(-acc / (double)rows);
    }
}

// dlogp[i, j] = j == labels[i] ? -dloss[0] / rows : 0; writes every element
// (rows with an invalid label get all zeros; the forward pass already
// reported them as a NaN loss).
// Launch: block 256, grid = max(1, min(ceil(rows*cols/256), 32*SMs)), no
// dynamic shared memory; any 1-D grid/block is correct.
extern "C" __global__ void nll_bwd_f32(float* dlogp, const float* labels, const float* dloss, int rows, int cols) {
    const long long n = (long long)rows * cols;
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (cols <= 0 || e >= n) return;
    const float g = -dloss[0] / (float)rows;  // the CPU's `-d / rows as f32`
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long step_r = stride / cols;
    const int step_j = (int)(stride % cols);
    long long r = e / cols;
    int j = (int)(e % cols);
    for (; e < n; e += stride) {
        dlogp[e] = j == rv_loss_label(labels[r], cols) ? g : 0.0f;
        r += step_r;
        j += step_j;
        if (j >= cols) {
            j -= cols;
            ++r;
        }
    }
}
