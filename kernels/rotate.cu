// Image rotation, zoom, flips and translation (data augmentation, transformed
// evaluation, the measure): inverse mapping through a per-image affine sampling
// matrix, nearest or bilinear sampling, the same size out as in.
//
// Bit-compatible with the CPU reference (src/backend/cpu/rotate.rs): the host
// passes the per-image matrices already rounded to f32 (rotations snapped at
// multiples of 90 degrees), and every product and sum below is an explicitly rounded
// __fmul_rn/__fadd_rn so nvcc cannot contract them into FMAs.
#include "rotvar_common.cuh"

// Sample of channel plane p (H x W) at integral float coordinates (ix, iy),
// or the fill value outside the image. The offset is 32-bit: H*W fits in int
// (the host checks), and 64-bit index products cost instructions per tap.
__device__ __forceinline__ float rv_rot_tap(const float* p, float ix, float iy, int H, int W, float fill) {
    if (ix >= 0.0f && iy >= 0.0f && ix < (float)W && iy < (float)H) return p[(int)iy * W + (int)ix];
    return fill;
}

// (1-t)*a + t*b, or a itself when t is exactly 0.
__device__ __forceinline__ float rv_rot_lerp(float a, float b, float t) {
    return __fadd_rn(__fmul_rn(1.0f - t, a), __fmul_rn(t, b));
}

// y[n,c,oy,ox] = x[n,c] sampled at the image of (fx, fy) = ((ox-cx)-tx, (oy-cy)-ty)
// under matrix n, about the centre (cx, cy) = ((W-1)/2, (H-1)/2):
//   sx = (m0*fx + m1*fy) + cx,  sy = (m2*fx + m3*fy) + cy,  [m0..m3, tx, ty] = mats[6n..6n+6]
// (a translation by (tx, ty) moves the content right and down; tx = ty = 0 leaves
// every bit as without it)
// (a rotation by t counter-clockwise as displayed is [cos, -sin, sin, cos]). interp 0: nearest (rintf, half to even); 1:
// bilinear, each tap outside the image reads fill[c], a zero weight skips its
// taps so integral source points copy the pixel exactly. y must not alias x.
// variant: one thread per output element. Each thread splits its first element
// index into (img, ch, oy, ox) once and then steps by the grid's stride as a
// mixed-radix addition with carries: the 64-bit divisions the index split
// needs cost more instructions than the sampling itself (the first variant
// split every element and ran at 14% of the copy bandwidth on an H200,
// instruction-bound at 77% SM throughput, 2026-12-04). Loop body in SASS: 264
// instructions before, 180 now, at 37 registers (75% occupancy). Capping it at
// 32 registers (__launch_bounds__(256, 8)) gave 209 instructions at 100%; for a
// kernel limited by issue rather than latency, the shorter loop is the choice,
// to be confirmed on the next lease (rotate vs copy in run_gpu.sh).
// Launch: block 256, grid = max(1, min(ceil(N*C*H*W/256), 32*SMs)), no dynamic
// shared memory; any 1-D grid/block is correct. The host guarantees H*W and
// N*C fit in int.
extern "C" __global__ void warp_f32(float* y, const float* x, const float* mats, const float* fill, int interp,
                                      int N, int C, int H, int W) {
    const int hw = H * W;
    if (hw <= 0 || C <= 0) return;
    const long long total = (long long)N * C * hw;
    const float cx = 0.5f * (float)(W - 1), cy = 0.5f * (float)(H - 1);
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    // The position and the stride, each as (img, ch, oy, ox) digits of radix (N, C, H, W).
    long long q = e / hw;
    int r = (int)(e - q * hw);
    int oy = r / W, ox = r - oy * W;
    int img = (int)(q / C), ch = (int)(q - (long long)img * C);
    q = stride / hw;
    r = (int)(stride - q * hw);
    const int s_oy = r / W, s_ox = r - s_oy * W;
    const long long s_img = q / C;
    const int s_ch = (int)(q - s_img * C);
    for (; e < total; e += stride) {
        const long long plane = (long long)img * C + ch;
        const float* m = mats + 6 * (long long)img;
        const float fv = fill[ch];
        const float* p = x + plane * hw;
        const float fx = __fadd_rn(__fadd_rn((float)ox, -cx), -m[4]);
        const float fy = __fadd_rn(__fadd_rn((float)oy, -cy), -m[5]);
        const float sx = __fadd_rn(__fadd_rn(__fmul_rn(m[0], fx), __fmul_rn(m[1], fy)), cx);
        const float sy = __fadd_rn(__fadd_rn(__fmul_rn(m[2], fx), __fmul_rn(m[3], fy)), cy);
        float v;
        if (interp == 0) {
            v = rv_rot_tap(p, rintf(sx), rintf(sy), H, W, fv);
        } else {
            const float x0 = floorf(sx), y0 = floorf(sy);
            const float wx = __fadd_rn(sx, -x0), wy = __fadd_rn(sy, -y0);
            float top = rv_rot_tap(p, x0, y0, H, W, fv);
            if (wx != 0.0f) top = rv_rot_lerp(top, rv_rot_tap(p, __fadd_rn(x0, 1.0f), y0, H, W, fv), wx);
            v = top;
            if (wy != 0.0f) {
                const float y1 = __fadd_rn(y0, 1.0f);
                float bot = rv_rot_tap(p, x0, y1, H, W, fv);
                if (wx != 0.0f) bot = rv_rot_lerp(bot, rv_rot_tap(p, __fadd_rn(x0, 1.0f), y1, H, W, fv), wx);
                v = rv_rot_lerp(top, bot, wy);
            }
        }
        y[e] = v;
        // Next position: each digit sum stays below twice its radix, so one carry each.
        ox += s_ox;
        int carry = ox >= W;
        ox -= carry * W;
        oy += s_oy + carry;
        carry = oy >= H;
        oy -= carry * H;
        ch += s_ch + carry;
        carry = ch >= C;
        ch -= carry * C;
        // e passes total exactly when img passes N-1; clamped, img stays an int.
        const long long next = (long long)img + s_img + carry;
        img = next < N ? (int)next : N;
    }
}
