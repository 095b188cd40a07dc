// variant: probes of one tensor-core instruction, not used by the model. One warp loads row-major
// A, B and C from global memory into fragments by the coordinate functions of mma.cuh, runs a
// single mma (or, for 3xTF32, the three of rv_split_tf32's scheme) and writes D back by the same
// layout. Under the emulator they test the twins against a plain matrix product
// (tests/mma_emulated.rs); on a GPU (`rotvar selftest`) they test the hardware against the twins:
// a misread fragment layout shows up as wrong elements there.
//   prec = RV_PREC_TF32, RV_PREC_3XTF32: A [16][8], B [8][8];  RV_PREC_BF16: A [16][16], B [16][8].
//   C, D [16][8]; D may not alias C. A, B are rounded as the precision does (3xTF32: split).
//   Launch: block = (32,1,1), grid = (1,1,1); anything else traps.
#include "mma.cuh"

extern "C" __global__ void mma_probe(float* D, const float* A, const float* B, const float* C, int prec) {
    if (blockDim.x != 32 || blockDim.y != 1 || blockDim.z != 1 || gridDim.x != 1 || gridDim.y != 1 || gridDim.z != 1)
        __trap();
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    float d[4];
    for (int i = 0; i < 4; ++i) d[i] = C[rv_mma_c_row(i, g) * 8 + rv_mma_c_col(i, t)];
    if (prec == RV_PREC_BF16) {
        unsigned a[4], b[2];
        for (int r = 0; r < 4; ++r)
            a[r] = rv_bf16x2(A[rv_bf16_a_row(2 * r, g) * 16 + rv_bf16_a_col(2 * r, t)],
                             A[rv_bf16_a_row(2 * r + 1, g) * 16 + rv_bf16_a_col(2 * r + 1, t)]);
        for (int r = 0; r < 2; ++r)
            b[r] = rv_bf16x2(B[rv_bf16_b_row(2 * r, t) * 8 + g], B[rv_bf16_b_row(2 * r + 1, t) * 8 + g]);
        rv_mma_bf16(d, a, b);
    } else if (prec == RV_PREC_TF32 || prec == RV_PREC_3XTF32) {
        unsigned ah[4], al[4], bh[2], bl[2];
        for (int i = 0; i < 4; ++i) rv_split_tf32(A[rv_tf32_a_row(i, g) * 8 + rv_tf32_a_col(i, t)], ah[i], al[i]);
        for (int i = 0; i < 2; ++i) rv_split_tf32(B[rv_tf32_b_row(i, t) * 8 + g], bh[i], bl[i]);
        if (prec == RV_PREC_3XTF32) {
            rv_mma_tf32(d, al, bh);
            rv_mma_tf32(d, ah, bl);
        }
        rv_mma_tf32(d, ah, bh);
    } else {
        __trap();
    }
    for (int i = 0; i < 4; ++i) D[rv_mma_c_row(i, g) * 8 + rv_mma_c_col(i, t)] = d[i];
}
