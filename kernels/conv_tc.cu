// Tensor-core twins of the convolution kernels of conv.cu.
// variant tc: the kernels of conv.cu with the FMA main loop replaced by mma.sync (RvTcTile in mma.cuh):
// same loaders, tiles, grids, split-K and epilogues, one extra argument `prec` (RV_PREC_TF32,
// RV_PREC_3XTF32 or RV_PREC_BF16; anything else traps). The operands are rounded to tf32 or bf16
// as they leave shared memory; accumulation stays fp32. Launches as their fp32 twins (same
// grid, block and split rules); they add BM * (BN + 4) floats of static shared memory for the
// accumulators' way back to the 4 x 4 per thread (17 KiB). __launch_bounds__(256, 3): left to
// itself ptxas held them to 64 registers and spilled; three blocks per SM allow 85.
#include "conv.cuh"

extern "C" __global__ void __launch_bounds__(256, 3)
    conv2d_fwd_tc_bm64(float* y, const float* x, const float* w, const float* bias, int N, int C, int H, int W, int K,
                       int R, int S, int stride, int pad, int OH, int OW, int act, int prec) {
    RV_BY_PREC(prec, (rvc_conv_fwd<64, P>(y, x, w, bias, N, C, H, W, K, R, S, stride, pad, OH, OW, act)));
}
extern "C" __global__ void __launch_bounds__(256, 3)
    conv2d_fwd_tc_bm32(float* y, const float* x, const float* w, const float* bias, int N, int C, int H, int W, int K,
                       int R, int S, int stride, int pad, int OH, int OW, int act, int prec) {
    RV_BY_PREC(prec, (rvc_conv_fwd<32, P>(y, x, w, bias, N, C, H, W, K, R, S, stride, pad, OH, OW, act)));
}
extern "C" __global__ void __launch_bounds__(256, 3)
    conv2d_fwd_tc_bm16(float* y, const float* x, const float* w, const float* bias, int N, int C, int H, int W, int K,
                       int R, int S, int stride, int pad, int OH, int OW, int act, int prec) {
    RV_BY_PREC(prec, (rvc_conv_fwd<16, P>(y, x, w, bias, N, C, H, W, K, R, S, stride, pad, OH, OW, act)));
}
extern "C" __global__ void __launch_bounds__(256, 3)
    conv2d_bwd_data_tc_bm64(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                            int stride, int pad, int OH, int OW, int prec) {
    RV_BY_PREC(prec, (rvc_conv_bwd_data<64, P>(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW)));
}
extern "C" __global__ void __launch_bounds__(256, 3)
    conv2d_bwd_data_tc_bm32(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                            int stride, int pad, int OH, int OW, int prec) {
    RV_BY_PREC(prec, (rvc_conv_bwd_data<32, P>(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW)));
}
extern "C" __global__ void __launch_bounds__(256, 3)
    conv2d_bwd_data_tc_bm16(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                            int stride, int pad, int OH, int OW, int prec) {
    RV_BY_PREC(prec, (rvc_conv_bwd_data<16, P>(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW)));
}
extern "C" __global__ void __launch_bounds__(256, 3)
    conv2d_bwd_data_tc_v3(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                          int stride, int pad, int OH, int OW, int prec) {
    RV_BY_PREC(prec, (rvc_conv_bwd_data_phase<P>(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW)));
}
extern "C" __global__ void __launch_bounds__(256, 3)
    conv2d_bwd_weight_tc_bm64(float* partial, const float* x, const float* dy, int N, int C, int H, int W, int K, int R,
                              int S, int stride, int pad, int OH, int OW, int splits, int prec) {
    RV_BY_PREC(prec, (rvc_conv_bwd_weight<64, P>(partial, x, dy, N, C, H, W, K, R, S, stride, pad, OH, OW, splits)));
}
extern "C" __global__ void __launch_bounds__(256, 3)
    conv2d_bwd_weight_tc_bm32(float* partial, const float* x, const float* dy, int N, int C, int H, int W, int K, int R,
                              int S, int stride, int pad, int OH, int OW, int splits, int prec) {
    RV_BY_PREC(prec, (rvc_conv_bwd_weight<32, P>(partial, x, dy, N, C, H, W, K, R, S, stride, pad, OH, OW, splits)));
}
extern "C" __global__ void __launch_bounds__(256, 3)
    conv2d_bwd_weight_tc_bm16(float* partial, const float* x, const float* dy, int N, int C, int H, int W, int K, int R,
                              int S, int stride, int pad, int OH, int OW, int splits, int prec) {
    RV_BY_PREC(prec, (rvc_conv_bwd_weight<16, P>(partial, x, dy, N, C, H, W, K, R, S, stride, pad, OH, OW, splits)));
}

// variant tc_v5: the v5 kernels (128 x 128 tiles filled by cp.async, conv.cu) on tensor cores:
// RvTcTile's 128 x 128 tile, 8 warps of 64 x 32, so each A fragment feeds 4 mma and each B
// fragment 4, where the 64 x 64 tile's 32 x 16 warp tiles feed 2. The accumulators return to
// the 8 x 8 per thread through stage A, a quarter of the tile at a time, so v5's epilogues and
// its 34 KiB of static shared memory serve unchanged. Launches as v5 (backward-data stride 1
// only), plus `prec`. __launch_bounds__(256, 1): 64 accumulators plus 3xTF32's split
// fragments spilled hundreds of bytes at 128 registers.
extern "C" __global__ void __launch_bounds__(256, 1)
    conv2d_fwd_tc_v5(float* y, const float* x, const float* w, const float* bias, int N, int C, int H, int W, int K,
                     int R, int S, int stride, int pad, int OH, int OW, int act, int prec) {
    RV_BY_PREC(prec, (rvc_conv_fwd<128, P, true>(y, x, w, bias, N, C, H, W, K, R, S, stride, pad, OH, OW, act)));
}
extern "C" __global__ void __launch_bounds__(256, 1)
    conv2d_bwd_data_tc_v5(float* dx, const float* dy, const float* w, int N, int C, int H, int W, int K, int R, int S,
                          int stride, int pad, int OH, int OW, int prec) {
    RV_BY_PREC(prec, (rvc_conv_bwd_data<128, P, true>(dx, dy, w, N, C, H, W, K, R, S, stride, pad, OH, OW)));
}
extern "C" __global__ void __launch_bounds__(256, 1)
    conv2d_bwd_weight_tc_v5(float* partial, const float* x, const float* dy, int N, int C, int H, int W, int K, int R,
                            int S, int stride, int pad, int OH, int OW, int splits, int prec) {
    RV_BY_PREC(prec,
               (rvc_conv_bwd_weight<128, P, true>(partial, x, dy, N, C, H, W, K, R, S, stride, pad, OH, OW, splits)));
}
