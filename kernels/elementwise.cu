// Elementwise kernels and fused optimizer updates.
//
// Launch: any 1-D grid/block (typically block=256, grid=min(ceil(n/1024),
// 32*SMs)); every kernel is a grid-stride loop, so correctness never depends on
// the grid covering n. Outputs may alias inputs (in-place use is expected), so
// no __restrict__ and no __ldg here.
//
// Vector path: when every pointer is 16-byte aligned each thread moves float4s
// (fewer, wider transactions: these kernels are purely bandwidth bound); the
// scalar loop then finishes the n % 4 tail. Misaligned views (e.g. a tensor
// slice at an odd offset) take the scalar loop for everything.
#include "rotvar_common.cuh"

typedef unsigned long long rv_u64;

__device__ __forceinline__ bool rv_aligned16(const void* p) { return (reinterpret_cast<rv_u64>(p) & 15ull) == 0; }

__device__ __forceinline__ long long rv_tid() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long rv_stride() { return (long long)gridDim.x * blockDim.x; }

// Applies f(i) for i in [0, n) where f handles one element; f4(i4) handles
// elements 4*i4 .. 4*i4+3 and is only used when `vec` is true.
template <class F4, class F1>
__device__ __forceinline__ void rv_grid_stride(long long n, bool vec, F4 f4, F1 f1) {
    const long long tid = rv_tid(), stride = rv_stride();
    const long long n4 = vec ? n / 4 : 0;
    for (long long i = tid; i < n4; i += stride) f4(i);
    for (long long i = n4 * 4 + tid; i < n; i += stride) f1(i);
}

#define RV_MAP4(OP, a) make_float4(OP((a).x), OP((a).y), OP((a).z), OP((a).w))
#define RV_ZIP4(OP, a, b) make_float4(OP((a).x, (b).x), OP((a).y, (b).y), OP((a).z, (b).z), OP((a).w, (b).w))

extern "C" __global__ void fill_f32(float* y, float value, long long n) {
    rv_grid_stride(
        n, rv_aligned16(y),
        [&](long long i) { reinterpret_cast<float4*>(y)[i] = make_float4(value, value, value, value); },
        [&](long long i) { y[i] = value; });
}

// out = act(a + b)   (act RV_ACT_*: a residual sum and the ReLU after it in one pass)
extern "C" __global__ void add_f32(float* out, const float* a, const float* b, int act, long long n) {
    auto op = [act](float x, float y) { return rv_act(act, x + y); };
    rv_grid_stride(
        n, rv_aligned16(out) && rv_aligned16(a) && rv_aligned16(b),
        [&](long long i) {
            float4 x = reinterpret_cast<const float4*>(a)[i], z = reinterpret_cast<const float4*>(b)[i];
            reinterpret_cast<float4*>(out)[i] = RV_ZIP4(op, x, z);
        },
        [&](long long i) { out[i] = op(a[i], b[i]); });
}

// out = a * b
extern "C" __global__ void mul_f32(float* out, const float* a, const float* b, long long n) {
    auto op = [](float x, float y) { return x * y; };
    rv_grid_stride(
        n, rv_aligned16(out) && rv_aligned16(a) && rv_aligned16(b),
        [&](long long i) {
            float4 x = reinterpret_cast<const float4*>(a)[i], z = reinterpret_cast<const float4*>(b)[i];
            reinterpret_cast<float4*>(out)[i] = RV_ZIP4(op, x, z);
        },
        [&](long long i) { out[i] = op(a[i], b[i]); });
}

// out = alpha * x
extern "C" __global__ void scale_f32(float* out, const float* x, float alpha, long long n) {
    auto op = [alpha](float v) { return alpha * v; };
    rv_grid_stride(
        n, rv_aligned16(out) && rv_aligned16(x),
        [&](long long i) {
            float4 v = reinterpret_cast<const float4*>(x)[i];
            reinterpret_cast<float4*>(out)[i] = RV_MAP4(op, v);
        },
        [&](long long i) { out[i] = op(x[i]); });
}

// y += alpha * x  (gradient accumulation, residual adds)
extern "C" __global__ void axpy_f32(float* y, const float* x, float alpha, long long n) {
    auto op = [alpha](float yv, float xv) { return fmaf(alpha, xv, yv); };
    rv_grid_stride(
        n, rv_aligned16(y) && rv_aligned16(x),
        [&](long long i) {
            float4 yv = reinterpret_cast<const float4*>(y)[i], xv = reinterpret_cast<const float4*>(x)[i];
            reinterpret_cast<float4*>(y)[i] = RV_ZIP4(op, yv, xv);
        },
        [&](long long i) { y[i] = op(y[i], x[i]); });
}

extern "C" __global__ void relu_fwd_f32(float* y, const float* x, long long n) {
    auto op = [](float v) { return rv_relu(v); };
    rv_grid_stride(
        n, rv_aligned16(y) && rv_aligned16(x),
        [&](long long i) {
            float4 v = reinterpret_cast<const float4*>(x)[i];
            reinterpret_cast<float4*>(y)[i] = RV_MAP4(op, v);
        },
        [&](long long i) { y[i] = op(x[i]); });
}

// dx = x > 0 ? dy : 0. `x` may be the forward input or output (same sign test).
extern "C" __global__ void relu_bwd_f32(float* dx, const float* dy, const float* x, long long n) {
    auto op = [](float g, float v) { return v > 0.f ? g : 0.f; };
    rv_grid_stride(
        n, rv_aligned16(dx) && rv_aligned16(dy) && rv_aligned16(x),
        [&](long long i) {
            float4 g = reinterpret_cast<const float4*>(dy)[i], v = reinterpret_cast<const float4*>(x)[i];
            reinterpret_cast<float4*>(dx)[i] = RV_ZIP4(op, g, v);
        },
        [&](long long i) { dx[i] = op(dy[i], x[i]); });
}

// y = x > 0 ? x : alpha * (exp(x) - 1); expm1f keeps precision near 0 (torch does the same).
extern "C" __global__ void elu_fwd_f32(float* y, const float* x, float alpha, long long n) {
    auto op = [alpha](float v) { return v > 0.f ? v : alpha * expm1f(v); };
    rv_grid_stride(
        n, rv_aligned16(y) && rv_aligned16(x),
        [&](long long i) {
            float4 v = reinterpret_cast<const float4*>(x)[i];
            reinterpret_cast<float4*>(y)[i] = RV_MAP4(op, v);
        },
        [&](long long i) { y[i] = op(x[i]); });
}

// dx = x > 0 ? dy : dy * alpha * exp(x), from the forward *input* x.
extern "C" __global__ void elu_bwd_f32(float* dx, const float* dy, const float* x, float alpha, long long n) {
    auto op = [alpha](float g, float v) { return v > 0.f ? g : g * alpha * expf(v); };
    rv_grid_stride(
        n, rv_aligned16(dx) && rv_aligned16(dy) && rv_aligned16(x),
        [&](long long i) {
            float4 g = reinterpret_cast<const float4*>(dy)[i], v = reinterpret_cast<const float4*>(x)[i];
            reinterpret_cast<float4*>(dx)[i] = RV_ZIP4(op, g, v);
        },
        [&](long long i) { dx[i] = op(dy[i], x[i]); });
}

// torch.optim.Adam (amsgrad=False, maximize=False, foreach/single-tensor
// path), fused into one pass:
//   g  = grad + weight_decay * p              (L2 penalty, not AdamW)
//   m  = lerp(m, g, 1 - beta1)                 (torch uses lerp_)
//   v  = beta2 * v + (1 - beta2) * g * g
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// The host computes step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t)
// and the (1 - beta) weights in double, as torch does in Python floats:
// 1.f - 0.999f in fp32 is off by 1.3e-5 relative, visible in v.
__device__ __forceinline__ void rv_adam_one(float& p, float g, float& m, float& v, float omb1, float beta2, float omb2,
                                            float eps, float wd, float step_size, float bc2_sqrt) {
    g = fmaf(wd, p, g);
    m = fmaf(omb1, g - m, m);
    v = fmaf(omb2, g * g, v * beta2);
    float denom = sqrtf(v) / bc2_sqrt + eps;
    p = p - step_size * (m / denom);
}

#define RV_ADAM(P, G, M, V) \
    rv_adam_one(P, G, M, V, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size, bias_correction2_sqrt)

extern "C" __global__ void adam_update_f32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                                           float step_size, float one_minus_beta1, float beta2, float one_minus_beta2,
                                           float eps, float weight_decay, float bias_correction2_sqrt, long long n) {
    rv_grid_stride(
        n, rv_aligned16(param) && rv_aligned16(grad) && rv_aligned16(exp_avg) && rv_aligned16(exp_avg_sq),
        [&](long long i) {
            float4 p = reinterpret_cast<float4*>(param)[i], g = reinterpret_cast<const float4*>(grad)[i];
            float4 m = reinterpret_cast<float4*>(exp_avg)[i], v = reinterpret_cast<float4*>(exp_avg_sq)[i];
            RV_ADAM(p.x, g.x, m.x, v.x);
            RV_ADAM(p.y, g.y, m.y, v.y);
            RV_ADAM(p.z, g.z, m.z, v.z);
            RV_ADAM(p.w, g.w, m.w, v.w);
            reinterpret_cast<float4*>(param)[i] = p;
            reinterpret_cast<float4*>(exp_avg)[i] = m;
            reinterpret_cast<float4*>(exp_avg_sq)[i] = v;
        },
        [&](long long i) {
            float p = param[i], m = exp_avg[i], v = exp_avg_sq[i];
            RV_ADAM(p, grad[i], m, v);
            param[i] = p;
            exp_avg[i] = m;
            exp_avg_sq[i] = v;
        });
}

// Every parameter tensor's Adam step in one launch (torch's foreach path does
// the same for the same reason: a small model has more tensors than its step
// has other kernels). `table` holds one record of RV_ADAM_REC 32-bit words per
// tensor:
//   [0..8)  addresses of param, grad, exp_avg, exp_avg_sq (low word, high word)
//   [8..10) n (low, high)
//   [10]    the tensor's first block; its blocks run to the next record's
//           first block (the last one's to gridDim.x). Non-decreasing.
//   [11]    its weight decay (float bits): biases and norms have none.
// The per-element arithmetic is adam_update_f32's, so the bits are the same
// as one launch per tensor. Launch: block 256 (any), grid = the last tensor's
// first block + its block count; any number of blocks >= 1 per tensor works.
#define RV_ADAM_REC 12
__device__ __forceinline__ void rv_adam_multi(const unsigned* table, int ntensors, float step_size,
                                              float one_minus_beta1, float beta2, float one_minus_beta2, float eps,
                                              float bias_correction2_sqrt) {
    int t = 0;  // the last record whose first block is <= this block; few records: a linear scan
    while (t + 1 < ntensors && table[(t + 1) * RV_ADAM_REC + 10] <= blockIdx.x) ++t;
    const unsigned* r = table + t * RV_ADAM_REC;
    auto word64 = [r](int w) { return (unsigned long long)r[w] | ((unsigned long long)r[w + 1] << 32); };
    float* param = reinterpret_cast<float*>(word64(0));
    const float* grad = reinterpret_cast<const float*>(word64(2));
    float* exp_avg = reinterpret_cast<float*>(word64(4));
    float* exp_avg_sq = reinterpret_cast<float*>(word64(6));
    const long long n = (long long)word64(8);
    const unsigned first = r[10], end = t + 1 < ntensors ? table[(t + 1) * RV_ADAM_REC + 10] : gridDim.x;
    const float weight_decay = __uint_as_float(r[11]);
    const long long stride = (long long)(end - first) * blockDim.x;
    for (long long i = (long long)(blockIdx.x - first) * blockDim.x + threadIdx.x; i < n; i += stride) {
        float p = param[i], m = exp_avg[i], v = exp_avg_sq[i];
        RV_ADAM(p, grad[i], m, v);
        param[i] = p;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }
}

extern "C" __global__ void adam_multi_f32(const unsigned* table, int ntensors, float step_size, float one_minus_beta1,
                                          float beta2, float one_minus_beta2, float eps, float bias_correction2_sqrt) {
    rv_adam_multi(table, ntensors, step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction2_sqrt);
}

// adam_multi_f32 with its six step scalars read from the device (step_size,
// 1 - beta1, beta2, 1 - beta2, eps, bc2_sqrt, in that order): the training
// step replayed as a CUDA graph stages this step's row of the epoch's scalar
// table there (feed_stage_u32), so the replay needs no new kernel arguments.
// Launch: as adam_multi_f32.
extern "C" __global__ void adam_multi_fed_f32(const unsigned* table, int ntensors, const float* scalars) {
    rv_adam_multi(table, ntensors, scalars[0], scalars[1], scalars[2], scalars[3], scalars[4], scalars[5]);
}

// torch.optim.SGD with momentum (maximize=False):
//   g = grad + weight_decay * p
//   buf = first_step ? g : momentum * buf + (1 - dampening) * g
//   d = nesterov ? g + momentum * buf : buf
//   p -= lr * d
// first_step replaces torch's "buffer is None" check; buf needs no init then.
__device__ __forceinline__ void rv_sgd_one(float& p, float g, float& b, float lr, float momentum, float dampening,
                                           float wd, int nesterov, int first_step) {
    g = fmaf(wd, p, g);
    b = first_step ? g : fmaf(1.f - dampening, g, b * momentum);
    float d = nesterov ? fmaf(momentum, b, g) : b;
    p = fmaf(-lr, d, p);
}

extern "C" __global__ void sgd_momentum_update_f32(float* param, const float* grad, float* momentum_buf, float lr,
                                                   float momentum, float dampening, float weight_decay, int nesterov,
                                                   int first_step, long long n) {
    rv_grid_stride(
        n, rv_aligned16(param) && rv_aligned16(grad) && rv_aligned16(momentum_buf),
        [&](long long i) {
            float4 p = reinterpret_cast<float4*>(param)[i], g = reinterpret_cast<const float4*>(grad)[i];
            float4 b = reinterpret_cast<float4*>(momentum_buf)[i];
            rv_sgd_one(p.x, g.x, b.x, lr, momentum, dampening, weight_decay, nesterov, first_step);
            rv_sgd_one(p.y, g.y, b.y, lr, momentum, dampening, weight_decay, nesterov, first_step);
            rv_sgd_one(p.z, g.z, b.z, lr, momentum, dampening, weight_decay, nesterov, first_step);
            rv_sgd_one(p.w, g.w, b.w, lr, momentum, dampening, weight_decay, nesterov, first_step);
            reinterpret_cast<float4*>(param)[i] = p;
            reinterpret_cast<float4*>(momentum_buf)[i] = b;
        },
        [&](long long i) {
            float p = param[i], b = momentum_buf[i];
            rv_sgd_one(p, grad[i], b, lr, momentum, dampening, weight_decay, nesterov, first_step);
            param[i] = p;
            momentum_buf[i] = b;
        });
}
