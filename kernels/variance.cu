// The streaming variance measure (docs/measure.md): per-layer f64 accumulators
// updated once per (batch, rotation). See Backend::variance_update for the
// exact semantics.
//
// Bit-compatible with the CPU reference (src/backend/cpu/variance.rs and
// src/backend/variance.rs): every double operation below is an explicitly
// rounded intrinsic, so nvcc cannot contract a multiply-add into an FMA (Rust
// never fuses either), and each unit's samples are folded in order by one
// thread. Given the same inputs, the GPU, the emulator and the CPU produce the
// same accumulator bits.
#include "rotvar_common.cuh"

// vals[r] = the value of row r (one unit of one sample) from its hw
// activation values act[r*hw .. r*hw + hw): mode 0 their sum in double, in
// index order; mode 1 that sum / hw; mode 2 the largest value (compared in
// float, the first of equal values wins, as the CPU's reduce_unit).
// variant: one thread per row, sequential over hw, so the order of the sum is
// fixed (a tree reduction over hw would need a different CPU twin).
// Launch: block 256, grid = max(1, min(ceil(rows/256), 16*SMs)), no shared
// memory; any 1-D grid/block is correct (grid-stride). hw >= 1.
extern "C" __global__ void variance_reduce_f64(double* vals, const float* act, long long rows, int hw, int mode) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += stride) {
        const float* x = act + r * hw;
        double v;
        if (mode == 2) {
            float mx = x[0];
            for (int k = 1; k < hw; ++k)
                if (x[k] > mx) mx = x[k];
            v = (double)mx;
        } else {
            double s = 0.0;
            for (int k = 0; k < hw; ++k) s = __dadd_rn(s, (double)x[k]);
            v = mode == 1 ? __ddiv_rn(s, (double)hw) : s;
        }
        vals[r] = v;
    }
}

// Welford's step with v as the count-th observation; the same roundings, in the
// same order, as welford_step in src/backend/variance.rs.
__device__ __forceinline__ void rv_welford(double& mean, double& m2, double v, double count) {
    const double d = __dadd_rn(v, -mean);
    mean = __dadd_rn(mean, __ddiv_rn(d, count));
    m2 = __dadd_rn(m2, __dmul_rn(d, __dadd_rn(v, -mean)));
}

// The V_t moments of one slot ti after rotation j of value v: (v, 0) at j = 0,
// else a Welford step with count j + 1. Returns the slot's M2.
__device__ __forceinline__ double rv_vt_step(double* vt_mean, double* vt_m2, long long ti, double v, int j) {
    double tm = v, t2 = 0.0;
    if (j > 0) {
        tm = vt_mean[ti];
        t2 = vt_m2[ti];
        rv_welford(tm, t2, v, (double)(j + 1));
    }
    vt_mean[ti] = tm;
    vt_m2[ti] = t2;
    return t2;
}

// A slot's standard deviation over its m rotations (0 when m = 1).
__device__ __forceinline__ double rv_slot_std(double m2, int m) {
    return m > 1 ? __dsqrt_rn(__ddiv_rn(m2, (double)(m - 1))) : 0.0;
}

// One rotation j of one batch of n samples, for every unit u:
// for b = 0..n-1 in order, v = vals[b*units + u], k = class_rank[b] (class),
// r = class_rank[n + b] (1-based running count within the class):
//   V_x moments at ((k*m + j)*units + u): Welford step with count r;
//   V_t moments at (b*units + u): (v, 0) at j = 0, else Welford step with
//   count j + 1;
//   at j = m-1: sum_std[k*units + u] += sqrt(M2_t / (m-1)) (0 when m = 1).
// The host checks every label < classes, n <= batch and j < m.
// variant: one thread per unit loops over the batch in order, so no two
// threads touch the same accumulator and no atomics are needed; a unit's
// samples must be folded sequentially anyway (Welford is order-dependent).
// Launch: block 256, grid = max(1, min(ceil(units/256), 16*SMs)), no shared
// memory; any 1-D grid/block is correct (grid-stride).
__device__ __forceinline__ void rv_update_v1(double* vx_mean, double* vx_m2, double* vt_mean, double* vt_m2,
                                             double* sum_std, const double* vals, const unsigned* class_rank, int n,
                                             int units, int m, int j) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long u = (long long)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += stride) {
        for (int b = 0; b < n; ++b) {
            const double v = vals[(long long)b * units + u];
            const unsigned k = class_rank[b];
            const double r = (double)class_rank[n + b];
            const long long xi = ((long long)k * m + j) * units + u;
            double xm = vx_mean[xi], x2 = vx_m2[xi];
            rv_welford(xm, x2, v, r);
            vx_mean[xi] = xm;
            vx_m2[xi] = x2;
            const double t2 = rv_vt_step(vt_mean, vt_m2, (long long)b * units + u, v, j);
            if (j + 1 == m) {
                const long long si = (long long)k * units + u;
                sum_std[si] = __dadd_rn(sum_std[si], rv_slot_std(t2, m));
            }
        }
    }
}

extern "C" __global__ void variance_update_f64(double* vx_mean, double* vx_m2, double* vt_mean, double* vt_m2,
                                               double* sum_std, const double* vals, const unsigned* class_rank, int n,
                                               int units, int m, int j) {
    rv_update_v1(vx_mean, vx_m2, vt_mean, vt_m2, sum_std, vals, class_rank, n, units, m, j);
}

// variance_update_f64 with j = fed[0], the feed counter of passes replayed as one graph
// (src/measure/fed.rs): a replay cannot take a new j as an argument. The host has checked
// that the counter stays below m. Launch: as variance_update_f64.
extern "C" __global__ void variance_update_f64_fed(double* vx_mean, double* vx_m2, double* vt_mean, double* vt_m2,
                                                   double* sum_std, const double* vals, const unsigned* class_rank,
                                                   int n, int units, int m, const unsigned* fed) {
    rv_update_v1(vx_mean, vx_m2, vt_mean, vt_m2, sum_std, vals, class_rank, n, units, m, (int)fed[0]);
}

// variance_update_f64_v2: the same update as variance_update_f64 (v1), to the
// bit, with the work cut along classes as well as units.
// Why: v1 gives each unit one thread that folds all n samples in order. With
// per-map units a layer has as few units as channels (32 for SimpleConv's
// first conv), so a launch ran 32 threads through 256 dependent steps, each a
// global load, a store and two double divisions: the measure took 5.6 times
// as long as the forward passes it observes (H200, 2026-12-04).
// Accumulator (k, j, u) of V_x and the class sum at (k, u) only see samples of
// class k, and the per-sample V_t moments at (b, u) only their own sample, so
// one thread per (unit, class) that folds its class's samples in increasing b
// performs exactly v1's sequence of operations on each accumulator: the same
// bits, units * classes threads, n / classes steps each, and V_x and the class
// sum kept in registers across the steps.
// labels (u32): class[n] | rank[n] | start[classes + 1] | order[n], where
//   order lists the samples of class 0 in increasing b, then class 1, ...,
//   and class k's samples are order[start[k] .. start[k+1]).
// Launch: block 256, grid = max(1, min(ceil(units*classes/256), 16*SMs)), no
// shared memory; any 1-D grid/block is correct (grid-stride).
__device__ __forceinline__ void rv_update_v2(double* vx_mean, double* vx_m2, double* vt_mean, double* vt_m2,
                                             double* sum_std, const double* vals, const unsigned* labels, int n,
                                             int units, int classes, int m, int j) {
    const unsigned* rank = labels + n;
    const unsigned* start = labels + 2 * n;
    const unsigned* order = start + classes + 1;
    const long long items = (long long)units * classes;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < items; t += stride) {
        // Neighbouring threads take neighbouring units of one class: they walk the same
        // samples, so their loads of vals and of the V_t moments coalesce.
        const int u = (int)(t % units), k = (int)(t / units);
        const unsigned first = start[k], last = start[k + 1];
        if (first == last) continue;
        const long long xi = ((long long)k * m + j) * units + u, si = (long long)k * units + u;
        double xm = vx_mean[xi], x2 = vx_m2[xi];
        double ss = j + 1 == m ? sum_std[si] : 0.0;
        for (unsigned p = first; p < last; ++p) {
            const int b = (int)order[p];
            const double v = vals[(long long)b * units + u];
            rv_welford(xm, x2, v, (double)rank[b]);
            const double t2 = rv_vt_step(vt_mean, vt_m2, (long long)b * units + u, v, j);
            if (j + 1 == m) ss = __dadd_rn(ss, rv_slot_std(t2, m));
        }
        vx_mean[xi] = xm;
        vx_m2[xi] = x2;
        if (j + 1 == m) sum_std[si] = ss;
    }
}

extern "C" __global__ void variance_update_f64_v2(double* vx_mean, double* vx_m2, double* vt_mean, double* vt_m2,
                                                  double* sum_std, const double* vals, const unsigned* labels, int n,
                                                  int units, int classes, int m, int j) {
    rv_update_v2(vx_mean, vx_m2, vt_mean, vt_m2, sum_std, vals, labels, n, units, classes, m, j);
}

// variance_update_f64_v2 with j = fed[0], as variance_update_f64_fed. Launch: as v2.
extern "C" __global__ void variance_update_f64_v2_fed(double* vx_mean, double* vx_m2, double* vt_mean,
                                                      double* vt_m2, double* sum_std, const double* vals,
                                                      const unsigned* labels, int n, int units, int classes, int m,
                                                      const unsigned* fed) {
    rv_update_v2(vx_mean, vx_m2, vt_mean, vt_m2, sum_std, vals, labels, n, units, classes, m, (int)fed[0]);
}
