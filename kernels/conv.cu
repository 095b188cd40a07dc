// The convolution kernels on CUDA cores: the numbered variants of each pass (v1, v2, v3, v4),
// and the deterministic reductions of the backward pass. What they share (tiles, loaders, main
// loop, epilogues) and their launch contracts are in conv.cuh; the tensor-core twins in
// conv_tc.cu.
#include "conv.cuh"

// variant v1: 64 x 64 tiles (see the design note at the top).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_fwd_v1(float* y, const float* x, const float* w, const float* bias, int N, int C, int H, int W, int K, int R,
                  int S, int stride, int pad, int OH, int OW, int act) {
    rvc_conv_fwd<64>(y, x, w, bias, N, C, H, W, K, R, S, stride, pad, OH, OW, act);
}

// variant v2: narrow tiles for layers with few output channels. A 64-row
// tile over K = 16 (LeNet's conv2) or K = 32 (SimpleConv's conv1/conv2)
// output channels spends 75% or 50% of its FMAs on rows that do not exist;
// 16 x 256 and 32 x 128 tiles keep every FMA useful with the same 4x4 per
// thread, at a slightly higher load/FMA ratio (2560 vs 2048 floats per
// 16-deep slice for BM = 32). The host picks the narrowest tile that holds K.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_fwd_v2_bm32(float* y, const float* x, const float* w, const float* bias, int N, int C, int H, int W, int K, int R,
                  int S, int stride, int pad, int OH, int OW, int act) {
    rvc_conv_fwd<32>(y, x, w, bias, N, C, H, W, K, R, S, stride, pad, OH, OW, act);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_fwd_v2_bm16(float* y, const float* x, const float* w, const float* bias, int N, int C, int H, int W, int K, int R,
                  int S, int stride, int pad, int OH, int OW, int act) {
    rvc_conv_fwd<16>(y, x, w, bias, N, C, H, W, K, R, S, stride, pad, OH, OW, act);
}

// variant v1: 64 x 64 tiles. v2: the narrow tiles of the forward pass, here
// for few *input* channels (M = C: LeNet's conv2 and conv3, SimpleConv's conv2).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_bwd_data_v1(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                  int stride, int pad, int OH, int OW) {
    rvc_conv_bwd_data<64>(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_bwd_data_v2_bm32(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                  int stride, int pad, int OH, int OW) {
    rvc_conv_bwd_data<32>(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_bwd_data_v2_bm16(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                  int stride, int pad, int OH, int OW) {
    rvc_conv_bwd_data<16>(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW);
}

// variant v3 (stride > 1): one GEMM per sub-pixel phase over its valid taps only (conv.cuh,
// "backward data, strided").
extern "C" __global__ void __launch_bounds__(256)
    conv2d_bwd_data_v3(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                       int stride, int pad, int OH, int OW) {
    rvc_conv_bwd_data_phase(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW);
}

// variant v1: 64 x 64 tiles. v2: the narrow tiles, chosen by the host where
// they compute fewer padding outputs of the K x CRS gradient (LeNet's conv2:
// 16 x 150 in one 16 x 256 tile instead of 64 x 192; SimpleConv's conv2:
// 32 x 288 in 32 x 384 instead of 64 x 320).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_bwd_weight_v1(float* partial, const float* x, const float* dy, int N, int C, int H, int W, int K, int R,
                  int S, int stride, int pad, int OH, int OW, int splits) {
    rvc_conv_bwd_weight<64>(partial, x, dy, N, C, H, W, K, R, S, stride, pad, OH, OW, splits);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_bwd_weight_v2_bm32(float* partial, const float* x, const float* dy, int N, int C, int H, int W, int K, int R,
                  int S, int stride, int pad, int OH, int OW, int splits) {
    rvc_conv_bwd_weight<32>(partial, x, dy, N, C, H, W, K, R, S, stride, pad, OH, OW, splits);
}

extern "C" __global__ void __launch_bounds__(256, 4)
    conv2d_bwd_weight_v2_bm16(float* partial, const float* x, const float* dy, int N, int C, int H, int W, int K, int R,
                  int S, int stride, int pad, int OH, int OW, int splits) {
    rvc_conv_bwd_weight<16>(partial, x, dy, N, C, H, W, K, R, S, stride, pad, OH, OW, splits);
}

// ------------------------------------------------------------ v4: 128 x 128
// variant v4: what v1 spends its issue slots on besides FMAs. v1 gives each thread 4 x 4 outputs:
// 16 FMAs per two float4 shared reads, and per 16-deep slice 256 FMAs against its share of the
// implicit-GEMM gather (index decoding, bounds, global loads, shared stores) and two barriers;
// FFMA is about half of v1's main loop (benches/KERNELS.md). v4 gives each thread 8 x 8 outputs
// of a 128 x 128 tile: 64 FMAs per four float4 reads, 1024 per slice, while a thread's share of
// the gather only doubles (8 + 8 elements per slice). The forward and backward-data B loaders
// decode their taps once per slice and block (RvcTapB); backward-data is stride 1 only (the
// host runs v3 for the others). Per output the same sums in the same order as v1, so the same
// bits; the same grids with 128 in place of the tile edge; for wide layers (a block covers 128
// output channels). __launch_bounds__(256, 2): 128 registers, 64 of them accumulators;
// backward-data spilled at 128 and gets (256, 1). The host uses v4 where ROTVAR_CONV_TILES=v4
// says so (fp32 only) until a GPU has timed it against v1 and v2.
extern "C" __global__ void __launch_bounds__(256, 2)
    conv2d_fwd_v4(float* y, const float* x, const float* w, const float* bias, int N, int C, int H, int W, int K,
                  int R, int S, int stride, int pad, int OH, int OW, int act) {
    rvc_conv_fwd<128>(y, x, w, bias, N, C, H, W, K, R, S, stride, pad, OH, OW, act);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv2d_bwd_data_v4(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                       int stride, int pad, int OH, int OW) {
    rvc_conv_bwd_data<128>(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    conv2d_bwd_weight_v4(float* partial, const float* x, const float* dy, int N, int C, int H, int W, int K, int R,
                         int S, int stride, int pad, int OH, int OW, int splits) {
    rvc_conv_bwd_weight<128>(partial, x, dy, N, C, H, W, K, R, S, stride, pad, OH, OW, splits);
}

// variant v5: v4 with its tiles filled by cp.async, double-buffered, one barrier per slice
// (conv.cuh, "variant v5"). The loaders copy each element where v4's fetch + store put it,
// so the same tiles, the same FMAs in the same order, the same bits. Same grids and contract
// as v4 (backward-data stride 1 only), plus 34 KiB of static shared memory for the two stages.
// The host uses v5 where ROTVAR_CONV_TILES=v5 says so (fp32 only) until a GPU has timed it.
extern "C" __global__ void __launch_bounds__(256, 2)
    conv2d_fwd_v5(float* y, const float* x, const float* w, const float* bias, int N, int C, int H, int W, int K,
                  int R, int S, int stride, int pad, int OH, int OW, int act) {
    rvc_conv_fwd<128, RV_PREC_FP32, true>(y, x, w, bias, N, C, H, W, K, R, S, stride, pad, OH, OW, act);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv2d_bwd_data_v5(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                       int stride, int pad, int OH, int OW) {
    rvc_conv_bwd_data<128, RV_PREC_FP32, true>(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    conv2d_bwd_weight_v5(float* partial, const float* x, const float* dy, int N, int C, int H, int W, int K, int R,
                         int S, int stride, int pad, int OH, int OW, int splits) {
    rvc_conv_bwd_weight<128, RV_PREC_FP32, true>(partial, x, dy, N, C, H, W, K, R, S, stride, pad, OH, OW, splits);
}

// variant: a probe of RvcDivisor (conv.cuh), not used by the model: q[i] = x[i] / d for
// 0 <= x[i] < 2^31, d >= 1 (anything else traps). tests/conv_kernels_emulated.rs runs it
// against integer division on edge and random values.
// Launch: any 1-D grid and block (grid-stride).
extern "C" __global__ void conv_divisor_probe(int* q, const int* x, int d, long long n) {
    if (d < 1) __trap();
    const RvcDivisor div(d);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        if (x[i] < 0) __trap();
        q[i] = div.div(x[i]);
    }
}

// out[i] = partial[0*len + i] + partial[1*len + i] + ... in split order.
// variant: the second half of split-K without float atomics; one thread per
// element adds the splits left to right, so the bits depend only on `splits`
// and the data, never on the grid, block or scheduling. Grid-stride; any
// grid and block size (the host uses block 256 and its elementwise grid).
extern "C" __global__ void __launch_bounds__(1024)
    sum_partials_f32(float* out, const float* partial, int splits, long long len) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        float s = __ldg(partial + i);
        for (int z = 1; z < splits; ++z) s += __ldg(partial + (long long)z * len + i);
        out[i] = s;
    }
}

// out[c] = sum over n, i of x[(n*C + c)*HW + i]; block c sums channel c.
// variant: one block per channel keeps the summation order a function of
// (N, HW, blockDim) only; each thread walks the channel's N*HW elements with a
// block-sized stride (coalesced within an image), four loads in flight.
extern "C" __global__ void __launch_bounds__(1024) channel_sum_f32(float* out, const float* x, int N, int C, int HW) {
    if (blockDim.x % 32 != 0 || blockDim.y != 1 || blockDim.z != 1 || HW < 1) __trap();
    const int c = blockIdx.x, B = blockDim.x;
    const long long total = (long long)N * HW, cstride = (long long)C * HW;
    const float* xc = x + (long long)c * HW;
    // Element j = n*HW + i; advancing j by B advances (n, i) by (q, rem).
    const int q = B / HW, rem = B % HW;
    int n = threadIdx.x / HW, i = threadIdx.x % HW;
    auto step = [&]() {
        i += rem;
        n += q;
        if (i >= HW) {
            i -= HW;
            ++n;
        }
    };
    float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
    long long j = threadIdx.x;
    for (; j + 3LL * B < total; j += 4LL * B) {
        float v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            v[u] = __ldg(xc + n * cstride + i);
            step();
        }
        acc0 += v[0];
        acc1 += v[1];
        acc2 += v[2];
        acc3 += v[3];
    }
    for (; j < total; j += B) {
        acc0 += __ldg(xc + n * cstride + i);
        step();
    }
    const float s = rotvar_block_sum((acc0 + acc1) + (acc2 + acc3));
    if (threadIdx.x == 0) out[c] = s;
}
