// variant: emulator conformance probes, not used by the model.
// They exercise the CUDA features that cuda_emu.h emulates but the production
// kernels do not all use yet (every shuffle flavour, votes, dynamic shared
// memory, atomics, barriers after early exit). tests/kernels_emulated.rs
// checks the results against the documented CUDA semantics. Running the same
// probes on a GPU checks that the emulator and the hardware agree.
#include "rotvar_common.cuh"

// out[t] = shuffle of (t * 10 + 1) across the warp; mode 0 idx, 1 down, 2 up, 3 xor.
extern "C" __global__ void selftest_shfl(int* out, int mode, int arg, int width) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int v = t * 10 + 1;
    int r;
    switch (mode) {
        case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
        case 1: r = __shfl_down_sync(0xffffffffu, v, (unsigned)arg, width); break;
        case 2: r = __shfl_up_sync(0xffffffffu, v, (unsigned)arg, width); break;
        default: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
    }
    out[t] = r;
}

// Per warp: out[3w] = ballot(lane % modulo == 0), out[3w+1] = any(lane == probe),
// out[3w+2] = all(lane < probe).
extern "C" __global__ void selftest_vote(unsigned* out, int modulo, int probe) {
    const int lane = threadIdx.x & 31, warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const unsigned b = __ballot_sync(0xffffffffu, lane % modulo == 0);
    const int any = __any_sync(0xffffffffu, lane == probe);
    const int all = __all_sync(0xffffffffu, lane < probe);
    if (lane == 0) {
        out[3 * warp] = b;
        out[3 * warp + 1] = (unsigned)any;
        out[3 * warp + 2] = (unsigned)all;
    }
}

// Reverses each block's chunk of `in` through dynamic shared memory
// (shared_bytes = blockDim.x * 4). Slots past n are not written.
extern "C" __global__ void selftest_dyn_shared_reverse(float* out, const float* in, int n) {
    ROTVAR_DYN_SHARED(float, buf);
    const int base = blockIdx.x * blockDim.x, t = threadIdx.x;
    buf[t] = base + t < n ? in[base + t] : 0.f;
    __syncthreads();
    const int src = blockDim.x - 1 - t;
    if (base + t < n) out[base + t] = buf[src];
}

// counter += 1 per thread, fsum += i (exact in fp32 for small n, so any
// order gives the same bits), umax = max(i * 7 % 1000), fmax = max(-i / 3).
extern "C" __global__ void selftest_atomics(int* counter, float* fsum, unsigned* umax, float* fmax, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(counter, 1);
    atomicAdd(fsum, (float)i);
    atomicMax(umax, (unsigned)(i * 7 % 1000));
    rotvar_atomic_max_f32(fmax, -(float)i / 3.f);
}

// Threads >= live return at once; the rest rotate values through shared
// memory across three barriers. The CUDA guide calls non-uniform
// __syncthreads undefined, but sm_70+ hardware in practice does not wait for
// exited threads, and the emulator copies that so an early `return` in a
// bounds check cannot deadlock a test. Run on a GPU to confirm.
extern "C" __global__ void selftest_early_exit_sync(float* out, int live) {
    ROTVAR_SHARED(float, s, [1024]);
    const int t = threadIdx.x;
    if (t >= live) return;
    s[t] = (float)(t + 1000 * blockIdx.x);
    __syncthreads();
    const float v = s[(t + 1) % live];
    __syncthreads();
    s[t] = 2.f * v;
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = s[(t + 1) % live];
}
