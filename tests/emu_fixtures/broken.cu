// Deliberately broken kernels, one per class of bug the emulator's sanitizer
// must catch (tests/sanitizer.rs launches each and checks the report). Built
// into the emulator only (build.rs), never into PTX or the backend's table.
// Each is written the way the bug shows up in real code. Launch contract for
// all: blocks of 256 threads, n = 256 * gridDim.x unless stated.
#include "rotvar_common.cuh"
#include "cp_async.cuh"

// A tile is filled and read back transposed, but nobody waits for the fill.
extern "C" __global__ void broken_missing_barrier(float* out, const float* in) {
    ROTVAR_SHARED(float, tile, [256]);
    const int t = threadIdx.x, base = blockIdx.x * 256;
    tile[t] = in[base + t];
    // __syncthreads() belongs here.
    out[base + t] = tile[255 - t];
}

// A weight loader whose row offset is off by one: the last thread reads one
// value past the end of `w` (n values).
extern "C" __global__ void broken_read_past_end(float* out, const float* w, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = w[i + 1] * 2.f;
}

// `<=` where `<` was meant: writes out[n].
extern "C" __global__ void broken_write_past_end(float* out, const float* in, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = in[i < n ? i : 0] + 1.f;
}

// A halo read one element before the start of `in` for the first thread.
extern "C" __global__ void broken_read_before_start(float* out, const float* in, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i - 1] + in[i];
}

// An offset computed in the wrong unit: the last thread writes 3 KiB past the
// end of `out` (n = 256), beyond the red zone, into the guard page.
extern "C" __global__ void broken_write_far_past_end(float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int j = i == n - 1 ? n + 767 : i;
    out[j] = 1.f;
}

// Only half the block fills the tile; everyone reads its own slot.
extern "C" __global__ void broken_uninit_shared(float* out, const float* in) {
    ROTVAR_SHARED(float, tile, [256]);
    const int t = threadIdx.x, base = blockIdx.x * 256;
    if (t < 128) tile[t] = in[base + t];
    __syncthreads();
    out[base + t] = tile[t];
}

// The batch-norm mean/variance merge: a block reduction used twice in a row,
// missing its trailing barrier, so warp 0 may still read warp_sums from the
// first sum while other warps overwrite it for the second.
__device__ float broken_block_sum(float v) {
    ROTVAR_SHARED(float, warp_sums, [32]);
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    v = rotvar_warp_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0.f;
        v = rotvar_warp_sum(v);
    }
    return v;  // a __syncthreads() belongs before this return
}
// Mean and variance of each block's 256 values, with the block sum `Sum`.
template <float (*Sum)(float)>
__device__ void block_mean_var(float* mean_var, const float* x) {
    const float v = x[blockIdx.x * 256 + threadIdx.x];
    const float s = Sum(v);
    const float s2 = Sum(v * v);
    if (threadIdx.x == 0) {
        mean_var[2 * blockIdx.x] = s / 256.f;
        mean_var[2 * blockIdx.x + 1] = s2 / 256.f - (s / 256.f) * (s / 256.f);
    }
}
extern "C" __global__ void broken_reduction_no_trailing_barrier(float* mean_var, const float* x) {
    block_mean_var<broken_block_sum>(mean_var, x);
}

// atomicAdd replaced by +=: every thread of every block adds into one total.
extern "C" __global__ void broken_nonatomic_sum(float* total, const float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) *total += x[i];
}

// A barrier inside a branch that only some threads take; the rest meet them
// at a different barrier.
extern "C" __global__ void broken_divergent_barrier(float* out) {
    ROTVAR_SHARED(float, tile, [256]);
    const int t = threadIdx.x;
    tile[t] = (float)t;
    if (t < 64) __syncthreads();
    __syncthreads();
    out[blockIdx.x * 256 + t] = tile[(t + 1) & 255];
}

// A full-mask shuffle that only half of each warp reaches, while the other
// half waits at __syncthreads: hangs on a GPU.
extern "C" __global__ void broken_partial_shuffle(float* out) {
    float v = (float)threadIdx.x;
    if ((threadIdx.x & 31u) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[blockIdx.x * 256 + threadIdx.x] = v;
}

// A double-buffered pipeline through cp.async: block b streams `chunks` chunks of 256 floats
// of `in` (n valid, zero past them) into two shared stages, 16 bytes per copy by threads
// 0..63, and writes out[c*256 + t] = 2 * stage[255 - t] (another thread's copy). MODE 0 is
// correct: wait, barrier, then issue the next chunk into the other stage. The broken ones:
// 1 reads the stage before waiting for it, 2 issues the next chunk before the barrier (while
// slower threads still read that stage from the previous chunk), 3 never waits.
template <int MODE>
__device__ __forceinline__ void cp_async_pipeline(float* out, const float* in, int n, int chunks) {
    ROTVAR_SHARED(float, stage, [2][256]);
    const int t = threadIdx.x, base = blockIdx.x * 256 * chunks;
    auto issue = [&](int c) {
        if (t >= 64) return;
        const int i = base + c * 256 + 4 * t, left = n - i;
        const int bytes = left <= 0 ? 0 : left >= 4 ? 16 : 4 * left;
        rv_cp_async<16>(&stage[c & 1][4 * t], bytes ? in + i : in, bytes);
    };
    issue(0);
    rv_cp_async_commit();
    for (int c = 0; c < chunks; ++c) {
        if (MODE == 2 && c + 1 < chunks) issue(c + 1);
        if (MODE == 0 || MODE == 2) rv_cp_async_wait<0>();
        __syncthreads();
        if ((MODE == 0 || MODE == 3) && c + 1 < chunks) issue(c + 1);
        rv_cp_async_commit();
        const float v = stage[c & 1][255 - t];
        if (MODE == 1) rv_cp_async_wait<1>();
        out[base + c * 256 + t] = 2.f * v;
        if (MODE == 1 && c + 1 < chunks) issue(c + 1);
    }
    if (MODE == 1) rv_cp_async_wait<0>();
}
extern "C" __global__ void fixed_cp_async_pipeline(float* out, const float* in, int n, int chunks) {
    cp_async_pipeline<0>(out, in, n, chunks);
}
extern "C" __global__ void broken_cp_async_read_before_wait(float* out, const float* in, int n, int chunks) {
    cp_async_pipeline<1>(out, in, n, chunks);
}
extern "C" __global__ void broken_cp_async_issue_before_barrier(float* out, const float* in, int n, int chunks) {
    cp_async_pipeline<2>(out, in, n, chunks);
}
extern "C" __global__ void broken_cp_async_never_waits(float* out, const float* in, int n, int chunks) {
    cp_async_pipeline<3>(out, in, n, chunks);
}

// The same kernels written correctly: the sanitizer must stay silent.
extern "C" __global__ void fixed_transpose_tile(float* out, const float* in) {
    ROTVAR_SHARED(float, tile, [256]);
    const int t = threadIdx.x, base = blockIdx.x * 256;
    tile[t] = in[base + t];
    __syncthreads();
    out[base + t] = tile[255 - t];
}
extern "C" __global__ void fixed_atomic_sum(float* total, const float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(total, x[i]);
}
// rotvar_block_sum is __forceinline__; a plain wrapper gives the template an address.
__device__ float fixed_block_sum(float v) { return rotvar_block_sum(v); }
extern "C" __global__ void fixed_reduction(float* mean_var, const float* x) {
    block_mean_var<fixed_block_sum>(mean_var, x);
}
