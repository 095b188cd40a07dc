// Data movement and small row-wise kernels: minibatch gather, dropout,
// scalar broadcast, argmax, dense-layer bias gradient (the bias itself is
// added in the GEMM's epilogue, gemm.cu).
//
// Flat kernels (gather_rows, dropout, broadcast_scalar) are
// grid-stride loops: correctness never depends on the grid covering n, so the
// host may cap the grid (typically block=256, grid=min(ceil(n/256), 32*SMs)).
// Where a flat index must be split into (row, column), each thread splits its
// first index once and then advances both parts by the constant grid stride,
// so the loop has no 64-bit division.
#include "rotvar_common.cuh"

typedef unsigned long long rv_data_u64;

__device__ __forceinline__ long long rv_data_tid() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long rv_data_stride() { return (long long)gridDim.x * blockDim.x; }

// dst[i*row_len + j] = src[idx[i]*row_len + j]  (dst is [rows, row_len]).
// variant: the minibatch gather from the device-resident dataset.
// Launch: block 256, grid = max(1, min(ceil(rows*row_len / 256), 32*SMs)), no
// dynamic shared memory; any 1-D grid/block is correct.
// Every idx[i] must be < the number of rows of src: the host validates the
// indices before upload, as the CPU backend does (the kernel has no bound).
extern "C" __global__ void gather_rows_f32(float* dst, const float* src, const unsigned* idx, long long rows,
                                           long long row_len) {
    const long long n = rows * row_len;
    long long e = rv_data_tid();
    if (row_len <= 0 || e >= n) return;
    const long long stride = rv_data_stride();
    const long long step_r = stride / row_len, step_j = stride % row_len;
    long long r = e / row_len, j = e % row_len;
    for (; e < n; e += stride) {
        dst[e] = src[(long long)idx[r] * row_len + j];
        r += step_r;
        j += step_j;
        if (j >= row_len) {
            j -= row_len;
            ++r;
        }
    }
}

// rotvar::rng::splitmix64, ported exactly (unsigned 64-bit arithmetic wraps).
__device__ __forceinline__ rv_data_u64 rv_data_splitmix64(rv_data_u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// rotvar::rng::unit_f32: top 24 bits times 2^-24; both steps are exact in f32.
__device__ __forceinline__ float rv_data_unit_f32(rv_data_u64 bits) {
    return (float)(bits >> 40) * (1.0f / 16777216.0f);
}

// Inverted dropout, bit-identical to the CPU backend (dropout_keep_scale):
//   mask[i] = unit(splitmix64(seed ^ (i * 0xD1B54A32D192ED03))) < p ? 0 : 1/(1-p)
//   y[i]    = x[i] * mask[i]
// 1.0f/(1.0f-p) is an IEEE division (nvcc's default -prec-div=true), so the
// keep scale has the CPU's bits; y may alias x.
// variant: counter-based, so the mask depends only on (seed, i), never on the
// launch configuration.
// Launch: block 256, grid = max(1, min(ceil(n/256), 32*SMs)), no dynamic shared
// memory; any 1-D grid/block is correct.
__device__ __forceinline__ void rv_dropout(float* y, float* mask, const float* x, float p, rv_data_u64 seed,
                                           long long n) {
    const float keep = 1.0f / (1.0f - p);
    const long long stride = rv_data_stride();
    for (long long i = rv_data_tid(); i < n; i += stride) {
        const rv_data_u64 h = rv_data_splitmix64(seed ^ ((rv_data_u64)i * 0xD1B54A32D192ED03ull));
        const float m = rv_data_unit_f32(h) < p ? 0.0f : keep;
        mask[i] = m;
        y[i] = x[i] * m;
    }
}

extern "C" __global__ void dropout_fwd_f32(float* y, float* mask, const float* x, float p, unsigned long long seed,
                                           long long n) {
    rv_dropout(y, mask, x, p, seed, n);
}

// dropout_fwd_f32 with its seed read from the device: the layer's seed is
// splitmix64(step_seed ^ layer), step_seed = seed[0] | seed[1] << 32, as the
// host derives it (rotvar::nn, Layer::Dropout). The training step replayed as
// a CUDA graph stages each step's seed there (feed_stage_u32).
// Launch: as dropout_fwd_f32.
extern "C" __global__ void dropout_fed_f32(float* y, float* mask, const float* x, float p, const unsigned* seed,
                                           unsigned long long layer, long long n) {
    rv_dropout(y, mask, x, p, rv_data_splitmix64(((rv_data_u64)seed[0] | ((rv_data_u64)seed[1] << 32)) ^ layer), n);
}

// The feed: a training step's per-step values (batch indices, augmentation
// matrices, dropout seed, Adam's scalars) sit in tables with one row per step
// of an epoch, and a one-word device counter names this step's row. Kernels
// read the staged row, so a step captured once as a CUDA graph replays with
// new values and no host work. Words are copied as 32-bit patterns, whatever
// they hold (u32 indices, f32 bits).
//
// cur[i] = table[k*n + i], k = counter[0]; a k at or past `rows` traps (an
// epoch longer than its table is a host bug, and a silent wrap would train on
// the wrong batch).
// Launch: block 256, grid = max(1, min(ceil(n/256), 32*SMs)); any 1-D grid.
extern "C" __global__ void feed_stage_u32(unsigned* cur, const unsigned* table, const unsigned* counter, long long rows,
                                          long long n) {
    const long long k = counter[0];
    if (k >= rows) __trap();
    const long long stride = rv_data_stride();
    for (long long i = rv_data_tid(); i < n; i += stride) cur[i] = table[k * n + i];
}

// log[k*n + i] = src[i], k = counter[0] (k >= rows traps): where a replayed
// step leaves its loss and predictions for the host's periodic readback.
// Launch: as feed_stage_u32.
extern "C" __global__ void feed_store_u32(unsigned* log, const unsigned* src, const unsigned* counter, long long rows,
                                          long long n) {
    const long long k = counter[0];
    if (k >= rows) __trap();
    const long long stride = rv_data_stride();
    for (long long i = rv_data_tid(); i < n; i += stride) log[k * n + i] = src[i];
}

// counter[0] += 1: the step's last kernel, after every read of the counter
// (kernels on one stream run in order).
// Launch: one block of any size; only thread 0 of block 0 writes.
extern "C" __global__ void feed_advance_u32(unsigned* counter) {
    if (blockIdx.x == 0 && threadIdx.x == 0) counter[0] += 1;
}

// dx[i] = dy[0] * alpha  (backward of a full sum / mean). dx must not alias dy.
// Launch: block 256, grid = max(1, min(ceil(n/256), 32*SMs)), no dynamic shared
// memory; any 1-D grid/block is correct.
extern "C" __global__ void broadcast_scalar_f32(float* dx, const float* dy, float alpha, long long n) {
    const float v = dy[0] * alpha;
    const long long stride = rv_data_stride();
    for (long long i = rv_data_tid(); i < n; i += stride) dx[i] = v;
}

// out[r] = index of the first maximum of row r of x [rows, cols], as a float.
// Same result as the CPU loop `if x[j] > x[best] { best = j }` from best = 0:
// NaNs are never selected (they are skipped), except that a NaN at column 0
// makes the answer 0, as does an all-NaN row.
// variant: one warp per row; each lane scans a strided share of the row
// keeping its first maximum, then a butterfly picks (larger value, then
// smaller index), a total order, so all lanes agree.
// Launch: block 256 (8 rows per block; any multiple of 32 up to 1024, else
// __trap), grid = ceil(rows / (block/32)) (warps stride over rows, so a
// smaller grid is also correct), no dynamic shared memory.
extern "C" __global__ void argmax_rows_f32(float* out, const float* x, int rows, int cols) {
    if ((blockDim.x & 31u) != 0) __trap();
    const int lane = threadIdx.x & 31;
    const long long warps = blockDim.x >> 5;
    for (long long r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
        const float* row = x + r * cols;
        // Sentinel "no candidate yet": index cols with value -inf, so a -inf
        // element still beats it (v == bv, smaller index) but a NaN never does.
        float bv = __int_as_float(0xff800000);
        int bi = cols;
        for (int j = lane; j < cols; j += 32) {
            const float v = row[j];
            if (v > bv || (v == bv && j < bi)) {
                bv = v;
                bi = j;
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            if (bi >= cols || row[0] != row[0]) bi = 0;
            out[r] = (float)bi;
        }
    }
}

// out[j] = sum over i of x[i, j]  for x [rows, cols] (dense-layer bias gradient).
// variant: a block owns 32 adjacent columns (one per lane, so every load of a
// warp is one coalesced row segment) and its blockDim/32 warps split the rows
// (warp g takes rows g, g + blockDim/32, ...). Each thread accumulates in
// double; warp 0 then adds the per-warp partials in warp order. No atomics:
// the bits depend only on (rows, cols, blockDim), not on scheduling.
// Launch: block 256 (any multiple of 32 up to 1024, else __trap), grid =
// ceil(cols/32) (blocks stride over column tiles, so a smaller grid is also
// correct), no dynamic shared memory (8 KiB static).
extern "C" __global__ void __launch_bounds__(1024) sum_rows_f32(float* out, const float* x, int rows, int cols) {
    ROTVAR_SHARED(double, part, [32][32]);
    if ((blockDim.x & 31u) != 0) __trap();
    const int lane = threadIdx.x & 31, g = threadIdx.x >> 5, groups = blockDim.x >> 5;
    for (long long j0 = (long long)blockIdx.x * 32; j0 < cols; j0 += (long long)gridDim.x * 32) {
        const long long j = j0 + lane;
        double acc = 0.0;
        if (j < cols)
            for (long long i = g; i < rows; i += groups) acc += (double)x[i * cols + j];
        part[g][lane] = acc;
        __syncthreads();
        if (g == 0 && j < cols) {
            double s = 0.0;
            for (int k = 0; k < groups; ++k) s += part[k][lane];
            out[j] = (float)s;
        }
        // part[] is rewritten by the next column tile.
        __syncthreads();
    }
}
