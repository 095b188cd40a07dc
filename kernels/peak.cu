// Throughput probe for `rotvar bench` (not an op of any model): the fp32 FMA ceiling that
// `bench conv` reports each pass against.
//
// Each thread runs 8 independent FMA chains of `iters` steps: a chain's next FMA waits for the
// previous one (about 4 cycles), so 8 chains per thread and full occupancy keep every FMA pipe
// busy. The chains' sum is stored, so nothing can be optimized away and the CPU twin
// (`cpu::peak_fma_one`) can check the arithmetic: every step is one correctly rounded fmaf, so
// the two agree to the bit.
//
// Launch: 1-D, block 256, grid ceil(n/256); thread i writes out[i]. FLOPs = 16·iters·n.
#include "rotvar_common.cuh"

extern "C" __global__ void peak_fma_f32(float* out, float a, float b, int iters, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) x[c] = __fmul_rn((float)((i + c) % 97), 0.01f);
    // 32 steps per trip: 256 FFMA against the loop's counter, compare and branch, so the loop
    // takes ~1% of the issue slots. At nvcc's own unroll of 4 it took 3 of 35 (32 FFMA), and
    // "fraction of ceiling" read ~10% high. `bench conv` passes iters in multiples of 256.
#pragma unroll 32
    for (int k = 0; k < iters; ++k) {
#pragma unroll
        for (int c = 0; c < 8; ++c) x[c] = __fmaf_rn(x[c], a, b);
    }
    float s = x[0];
#pragma unroll
    for (int c = 1; c < 8; ++c) s = __fadd_rn(s, x[c]);
    out[i] = s;
}
