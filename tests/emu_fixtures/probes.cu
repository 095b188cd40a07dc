// Probes of the emulator's block scheduling (tests/sanitizer.rs): blocks of
// one launch run concurrently and in a different order each launch, so
// inter-block races and ordering assumptions show up. Emulator only.
#include "rotvar_common.cuh"

// Thread 0 of each block takes a ticket (its start position) and then waits,
// bounded, until some other block has started after it. With blocks run one
// at a time nobody ever sees another start, and the spin runs out.
// order[k] = the k-th block to start; saw_other[b] = 1 if block b saw one.
extern "C" __global__ void probe_block_schedule(unsigned* order, unsigned* saw_other, unsigned* counter) {
    if (threadIdx.x != 0) return;
    const unsigned k = atomicAdd(counter, 0u + 1u);
    order[k] = blockIdx.x;
    unsigned spins = 0;
    while (atomicAdd(counter, 0u) == k + 1 && k + 1 < gridDim.x && ++spins < 50000000u) {
    }
    saw_other[blockIdx.x] = atomicAdd(counter, 0u) > k + 1 ? 1u : 0u;
}

// Thread 0 sets flags[1] (it has started), then waits, bounded, until the host
// sets flags[0]: a launch that stays in progress for as long as a test needs.
extern "C" __global__ void probe_wait_for_host(unsigned* flags) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    atomicExch(&flags[1], 1u);
    unsigned spins = 0;
    while (atomicAdd(&flags[0], 0u) == 0u && ++spins < 200000000u) {
    }
}
