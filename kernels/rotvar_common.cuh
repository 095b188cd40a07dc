// Shared by every kernel file; compiles under nvcc and under the host
// emulator (emu/cuda_emu.h, which defines ROTVAR_EMU and these macros itself).
#pragma once

#ifndef ROTVAR_EMU
// One raw byte array for all kernels of a module: nvcc rejects two
// `extern __shared__` arrays with the same name but different types.
#define ROTVAR_DYN_SHARED(T, name)                                      \
    extern __shared__ __align__(16) unsigned char rotvar_dyn_smem_raw[]; \
    T* name = reinterpret_cast<T*>(rotvar_dyn_smem_raw)
// Static shared memory: `ROTVAR_SHARED(float, tile, [16][65]);`, 16-byte aligned. The
// emulator gives each concurrently running block its own copy, poisoned per block.
#define ROTVAR_SHARED(T, name, dims) __shared__ __align__(16) T name dims
#endif

// torch.relu: x > 0 ? x : 0, except that NaN propagates (fmaxf would drop it).
// The CPU twin is backend::relu.
__device__ __forceinline__ float rv_relu(float v) { return v > 0.f ? v : (v == v ? 0.f : v); }

// The activation a fused epilogue applies after the bias; the codes are
// backend::Activation::code (0 identity, 1 ReLU).
#define RV_ACT_IDENTITY 0
#define RV_ACT_RELU 1
__device__ __forceinline__ float rv_act(int act, float v) { return act == RV_ACT_RELU ? rv_relu(v) : v; }

// nvcc has no float atomicMax; the CAS loop is the portable spelling.
__device__ __forceinline__ float rotvar_atomic_max_f32(float* addr, float v) {
    int* p = reinterpret_cast<int*>(addr);
    int old = *p;
    while (__int_as_float(old) < v) {
        int prev = atomicCAS(p, old, __float_as_int(v));
        if (prev == old) break;
        old = prev;
    }
    return __int_as_float(old);
}

// Full-warp sum; every lane gets the total. Callers must have all 32 lanes live.
__device__ __forceinline__ float rotvar_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Block-wide sum; the result is valid in thread 0 only. blockDim.x must be a multiple of 32
// (at most 1024): the warp shuffles assume full warps. Safe to call repeatedly in one kernel.
__device__ __forceinline__ float rotvar_block_sum(float v) {
    ROTVAR_SHARED(float, warp_sums, [32]);
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    v = rotvar_warp_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    const unsigned nwarps = blockDim.x >> 5;
    if (warp == 0) {
        v = lane < nwarps ? warp_sums[lane] : 0.f;
        v = rotvar_warp_sum(v);
    }
    // Keeps warp_sums stable if the caller sums again.
    __syncthreads();
    return v;
}
