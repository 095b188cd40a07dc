// Deterministic reductions.
//
// reduce_sum_f32 is used twice for a full sum:
//   stage 1: grid=G (e.g. 2*SMs), block=256:  partials[G] = per-block sums
//   stage 2: grid=1,              block=1024: out[0] = scale * sum(partials)
// Float atomics would make the result depend on block scheduling; instead
// every block writes its own slot and a second launch folds the slots, so the
// bits depend only on (n, grid, block). `scale` turns stage 2 into a mean.
#include "rotvar_common.cuh"


// out[blockIdx.x] = scale * sum of this block's grid-stride share of x[0..n).
extern "C" __global__ void __launch_bounds__(1024) reduce_sum_f32(float* out, const float* __restrict__ x, long long n,
                                                                 float scale) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    // Four independent accumulators: hides FADD latency and keeps the serial
    // chain per accumulator short, which also helps accuracy.
    float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
    for (; i + 3 * stride < n; i += 4 * stride) {
        acc0 += __ldg(x + i);
        acc1 += __ldg(x + i + stride);
        acc2 += __ldg(x + i + 2 * stride);
        acc3 += __ldg(x + i + 3 * stride);
    }
    for (; i < n; i += stride) acc0 += __ldg(x + i);
    float s = rotvar_block_sum((acc0 + acc1) + (acc2 + acc3));
    if (threadIdx.x == 0) out[blockIdx.x] = s * scale;
}
