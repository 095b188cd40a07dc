// 2-D max / average pooling over NCHW planes, forward and backward.
//
// kind 0 = max: padded positions are ignored (window max over the in-image
//   part; the window max propagates NaN-ignoring, as fmaxf / Rust f32::max).
// kind 1 = avg: the window sum divided by k*k always (PyTorch
//   count_include_pad=True). Other kinds __trap().
// OH = (H + 2*pad - k) / stride + 1 (same for OW), passed by the host.
//
// Launch (both kernels): block = (256,1,1) (any size works), grid =
//   min(ceil(total / 256), 32*SMs) with total = N*C*OH*OW (fwd) or N*C*H*W
//   (bwd); grid-stride loops cover any grid. No shared memory.
//
// variant f32 (the only one): one thread per output element, summing in the
// same order as the CPU backend (rows, then columns), so the results match it
// bit for bit. Backward has no atomics: each thread owns one dx element and
// gathers over the output windows that contain it, in row-major window order
// (the order the CPU backend accumulates in). For max it recomputes each such
// window's first maximum from x (row-major scan, strict '>' keeps the first)
// and takes that window's dy only if the maximum is this element: no argmax
// buffer, at the cost of (k/stride)^2 * k^2 reads of x per dx element.
#include "rotvar_common.cuh"

// Valid input range [lo, hi) of window o along one axis (padding clipped).
__device__ __forceinline__ void rvp_window(int o, int stride, int pad, int k, int size, int& lo, int& hi) {
    const int start = o * stride - pad;
    lo = start > 0 ? start : 0;
    hi = start + k < size ? start + k : size;
}

extern "C" __global__ void __launch_bounds__(1024)
    pool2d_fwd_f32(float* y, const float* x, int kind, int N, int C, int H, int W, int k, int stride, int pad, int OH,
                   int OW) {
    if (kind != 0 && kind != 1) __trap();
    const long long total = (long long)N * C * OH * OW;
    const long long gstride = (long long)gridDim.x * blockDim.x;
    const float area = (float)(k * k);
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gstride) {
        const int ox = (int)(idx % OW);
        const long long t = idx / OW;
        const int oy = (int)(t % OH);
        const long long plane = t / OH;
        const float* xp = x + plane * H * W;
        int ylo, yhi, xlo, xhi;
        rvp_window(oy, stride, pad, k, H, ylo, yhi);
        rvp_window(ox, stride, pad, k, W, xlo, xhi);
        float out;
        if (kind == 0) {
            float m = -INFINITY;
            for (int iy = ylo; iy < yhi; ++iy)
                for (int ix = xlo; ix < xhi; ++ix) m = fmaxf(m, __ldg(xp + iy * W + ix));
            out = m;
        } else {
            float s = 0.f;
            for (int iy = ylo; iy < yhi; ++iy)
                for (int ix = xlo; ix < xhi; ++ix) s += __ldg(xp + iy * W + ix);
            out = s / area;
        }
        y[idx] = out;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    pool2d_bwd_f32(float* dx, const float* x, const float* dy, int kind, int N, int C, int H, int W, int k, int stride,
                   int pad, int OH, int OW) {
    if (kind != 0 && kind != 1) __trap();
    const long long total = (long long)N * C * H * W;
    const long long gstride = (long long)gridDim.x * blockDim.x;
    const float area = (float)(k * k);
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gstride) {
        const int ix = (int)(idx % W);
        const long long t = idx / W;
        const int iy = (int)(t % H);
        const long long plane = t / H;
        const float* xp = x + plane * H * W;
        const float* dyp = dy + plane * OH * OW;
        // Windows o with o*stride - pad <= i <= o*stride - pad + k - 1.
        const int ty = iy + pad, tx = ix + pad;  // >= 0
        const int oy_lo = ty - k + 1 > 0 ? (ty - k + stride) / stride : 0;
        const int ox_lo = tx - k + 1 > 0 ? (tx - k + stride) / stride : 0;
        const int oy_hi = min(ty / stride, OH - 1), ox_hi = min(tx / stride, OW - 1);
        const int self = iy * W + ix;
        float acc = 0.f;
        for (int oy = oy_lo; oy <= oy_hi; ++oy) {
            for (int ox = ox_lo; ox <= ox_hi; ++ox) {
                const float d = __ldg(dyp + oy * OW + ox);
                if (kind == 1) {
                    acc += d / area;
                    continue;
                }
                int ylo, yhi, xlo, xhi;
                rvp_window(oy, stride, pad, k, H, ylo, yhi);
                rvp_window(ox, stride, pad, k, W, xlo, xhi);
                float best = -INFINITY;
                int arg = -1;
                for (int wy = ylo; wy < yhi; ++wy)
                    for (int wx = xlo; wx < xhi; ++wx) {
                        const float v = __ldg(xp + wy * W + wx);
                        if (v > best || arg < 0) {
                            best = v;
                            arg = wy * W + wx;
                        }
                    }
                if (arg == self) acc += d;
            }
        }
        dx[idx] = acc;
    }
}
