// Asynchronous copies from global to shared memory (sm_80+): `cp.async`, `cp.async.commit_group`
// and `cp.async.wait_group`, as the PTX ISA (9.0) describes them under "Data Movement and
// Conversion Instructions: cp.async" and the two sections that follow it.
//
// A copy is issued with rv_cp_async, the copies issued so far are closed into a group with
// rv_cp_async_commit, and rv_cp_async_wait<N> returns once all but the newest N groups have
// landed. A landed copy is visible to its own thread; the others see it after a barrier. So a
// double-buffered main loop reads stage s after wait + __syncthreads, and must not issue into a
// stage before a barrier has ended every thread's reads of it.
//
// Each instruction sits in one small function with two bodies, as in mma.cuh: the PTX under
// nvcc; under the host emulator (ROTVAR_EMU) the runtime's twin, which poisons the destination
// at issue and lands the data at the wait, so that both a read too early and an issue too early
// are caught (kernels/emu/README.md, "cp.async"; tests/sanitizer.rs).
#pragma once
#include "rotvar_common.cuh"

// Copies BYTES (4, 8 or 16; both addresses aligned to it) from global `src` to shared `dst`,
// of which only the first `src_bytes` (0..BYTES) are read and the rest are zero-filled: 0 reads
// nothing and writes zeros, which is how a loader fills the tile outside the matrix (`src`
// must still be a valid global address). .cg (L2 only) is allowed for 16 bytes alone; the
// smaller copies use .ca.
template <int BYTES>
__device__ __forceinline__ void rv_cp_async(void* dst, const void* src, int src_bytes) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef ROTVAR_EMU
    ::rotvar_emu::cp_async(dst, src, BYTES, (unsigned)src_bytes, ROTVAR_EMU_SITE);
#else
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(src), "n"(BYTES), "r"(src_bytes)
                     : "memory");
#endif
}

__device__ __forceinline__ void rv_cp_async_commit() {
#ifdef ROTVAR_EMU
    ::rotvar_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N committed groups (the newest) are still in flight.
template <int N>
__device__ __forceinline__ void rv_cp_async_wait() {
#ifdef ROTVAR_EMU
    ::rotvar_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
