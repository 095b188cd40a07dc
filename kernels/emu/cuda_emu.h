// Host emulation of the CUDA execution model, force-included (g++ -include)
// into every kernels/*.cu by build.rs so the exact source nvcc compiles can
// run on a CPU-only machine. This header is the device side: what kernel code
// sees. The runtime behind it (thread pool, block scheduler, barriers, device
// memory, and the sanitizer: memcheck, initcheck, racecheck, synccheck) is in
// runtime.cpp. See README.md in this directory for the design and its limits.
//
// The kernels' translation units are compiled with -fsanitize=thread, but no
// ThreadSanitizer runtime is linked: runtime.cpp implements the __tsan_* hooks
// the compiler inserts before every load and store, and uses them to check
// bounds, uninitialised shared reads and races by CUDA's rules.
#pragma once
#ifdef __CUDACC__
#error "cuda_emu.h is for the host emulation build only; nvcc must not see it"
#endif

#define ROTVAR_EMU 1

#include <math.h>
#include <float.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <functional>
#include <type_traits>

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared memory must be declared with ROTVAR_SHARED (build.rs rejects a
// bare __shared__): each concurrently running block gets its own instance.
#define __shared__ __shared__is_not_supported_use_ROTVAR_SHARED
#define ROTVAR_SHARED(T, name, dims)                                                            \
    static const char rotvar_tag_##name = 0;                                                   \
    typedef T rotvar_type_##name dims;                                                          \
    rotvar_type_##name& name = *reinterpret_cast<rotvar_type_##name*>(::rotvar_emu::static_shared( \
        &rotvar_tag_##name, sizeof(rotvar_type_##name), alignof(rotvar_type_##name), #name))
#define ROTVAR_DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::rotvar_emu::dyn_shared())

#define ROTVAR_EMU_STR2(x) #x
#define ROTVAR_EMU_STR(x) ROTVAR_EMU_STR2(x)
// The source position of a barrier or collective: synccheck requires every
// thread of one barrier phase to come from the same one.
#define ROTVAR_EMU_SITE (__FILE__ ":" ROTVAR_EMU_STR(__LINE__))

// --------------------------------------------------------------- vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace rotvar_emu {

// Launch configuration passed from Rust; layout must match emu.rs EmuLaunch.
struct EmuLaunch {
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_bytes;
};

constexpr size_t kGatherBytes = 256;  // max per-lane payload of warp_allgather

// Runtime entry points (runtime.cpp).
int launch(const EmuLaunch* cfg, const char* name, const char* const* ptr_names, const void* const* ptrs,
           unsigned nptrs, const std::function<void()>& body);
void sync_block(const char* site);
void sync_warp();
// One warp collective: publish `mine` (at most kGatherBytes), wait for the warp, return the
// bank every lane published into (lane l's payload at l * kGatherBytes).
const unsigned char* warp_collective(const char* site, unsigned mask, const void* mine, size_t bytes);
unsigned warp_live_lanes();
unsigned lane_id();
void* static_shared(const void* tag, size_t bytes, size_t align, const char* name);
void* dyn_shared();
[[noreturn]] void trap();
// cp.async twins (cp_async.cuh): issue one copy, commit the open copies as a group, complete
// all but the newest `newest_pending` groups.
void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes, const char* site);
void cp_async_commit();
void cp_async_wait(unsigned newest_pending);

template <class T>
inline T warp_exchange(const char* site, unsigned mask, T mine, unsigned src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle payload");
    const unsigned char* bank = warp_collective(site, mask, &mine, sizeof(T));
    T out;
    memcpy(&out, bank + src * kGatherBytes, sizeof(T));
    return out;
}

// Every lane receives every lane's value; the building block for emulated
// twins of warp-wide instructions such as mma.sync (see README.md).
template <class T>
inline void warp_allgather(const T& mine, T (&all)[32]) {
    static_assert(sizeof(T) <= kGatherBytes && std::is_trivially_copyable<T>::value, "gather payload");
    const unsigned char* bank = warp_collective("warp_allgather", 0xffffffffu, &mine, sizeof(T));
    const unsigned n = warp_live_lanes();
    for (unsigned l = 0; l < 32; ++l) {
        if (l < n) memcpy(&all[l], bank + l * kGatherBytes, sizeof(T));
        else all[l] = T{};
    }
}

template <class T>
inline T shfl_idx(const char* site, unsigned mask, T v, int src, int width = 32) {
    const unsigned lane = lane_id(), base = lane & ~unsigned(width - 1);
    return warp_exchange(site, mask, v, base + (unsigned(src) & unsigned(width - 1)));
}
template <class T>
inline T shfl_down(const char* site, unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned lane = lane_id(), seg = lane & unsigned(width - 1);
    return warp_exchange(site, mask, v, seg + delta < unsigned(width) ? lane + delta : lane);
}
template <class T>
inline T shfl_up(const char* site, unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned lane = lane_id(), seg = lane & unsigned(width - 1);
    return warp_exchange(site, mask, v, seg >= delta ? lane - delta : lane);
}
template <class T>
inline T shfl_xor(const char* site, unsigned mask, T v, int lane_mask, int width = 32) {
    const unsigned lane = lane_id(), src = lane ^ unsigned(lane_mask);
    const unsigned seg_end = (lane & ~unsigned(width - 1)) + unsigned(width);
    return warp_exchange(site, mask, v, src < seg_end ? src : lane);
}
inline unsigned ballot(const char* site, unsigned mask, int pred) {
    const int mine = pred ? 1 : 0;
    const unsigned char* bank = warp_collective(site, mask, &mine, sizeof mine);
    const unsigned n = warp_live_lanes();
    unsigned m = 0;
    for (unsigned l = 0; l < n; ++l) {
        int v;
        memcpy(&v, bank + l * kGatherBytes, sizeof v);
        m |= (v ? 1u : 0u) << l;
    }
    return m;
}

}  // namespace rotvar_emu

// ------------------------------------------------------------ synchronisation
#define __syncthreads() ::rotvar_emu::sync_block(ROTVAR_EMU_SITE)
inline void __syncwarp(unsigned = 0xffffffffu) { rotvar_emu::sync_warp(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { rotvar_emu::trap(); }

// Out-of-segment sources return the caller's own value, as on hardware. Every
// lane named in the mask must reach the same collective (synccheck).
#define __shfl_sync(...) ::rotvar_emu::shfl_idx(ROTVAR_EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::rotvar_emu::shfl_down(ROTVAR_EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) ::rotvar_emu::shfl_up(ROTVAR_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::rotvar_emu::shfl_xor(ROTVAR_EMU_SITE, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::rotvar_emu::ballot(ROTVAR_EMU_SITE, (mask), (pred))
#define __any_sync(mask, pred) (::rotvar_emu::ballot(ROTVAR_EMU_SITE, (mask), (pred)) != 0u)
#define __all_sync(mask, pred) rotvar_emu_all_sync(ROTVAR_EMU_SITE, (mask), (pred))
inline int rotvar_emu_all_sync(const char* site, unsigned mask, int pred) {
    const unsigned n = rotvar_emu::warp_live_lanes();
    const unsigned live = n == 32 ? 0xffffffffu : ((1u << n) - 1);
    return (rotvar_emu::ballot(site, mask, pred) & live) == live;
}

// ------------------------------------------------------------------- atomics
// std::atomic_ref compiles to __atomic builtins, which -fsanitize=thread turns
// into __tsan_atomic* calls: racecheck knows them for atomics, not races.
#define ROTVAR_EMU_AREF(T, p) std::atomic_ref<T>(*(p))
inline float atomicAdd(float* p, float v) { return ROTVAR_EMU_AREF(float, p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return ROTVAR_EMU_AREF(double, p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return ROTVAR_EMU_AREF(int, p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return ROTVAR_EMU_AREF(unsigned, p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return ROTVAR_EMU_AREF(unsigned long long, p).fetch_add(v);
}
inline int atomicSub(int* p, int v) { return ROTVAR_EMU_AREF(int, p).fetch_sub(v); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return ROTVAR_EMU_AREF(unsigned, p).fetch_sub(v); }
template <class T>
inline T rotvar_emu_atomic_max(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T>
inline T rotvar_emu_atomic_min(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old;
}
inline int atomicMax(int* p, int v) { return rotvar_emu_atomic_max(p, v); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return rotvar_emu_atomic_max(p, v); }
inline int atomicMin(int* p, int v) { return rotvar_emu_atomic_min(p, v); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return rotvar_emu_atomic_min(p, v); }
// Emulator-only convenience; nvcc has no float atomicMax, so kernels that
// must compile under both use rotvar_atomic_max_f32 from rotvar_common.cuh.
inline float atomicMax(float* p, float v) { return rotvar_emu_atomic_max(p, v); }
template <class T>
inline T rotvar_emu_atomic_cas(T* p, T cmp, T v) {
    ROTVAR_EMU_AREF(T, p).compare_exchange_strong(cmp, v);
    return cmp;
}
inline int atomicCAS(int* p, int c, int v) { return rotvar_emu_atomic_cas(p, c, v); }
inline unsigned atomicCAS(unsigned* p, unsigned c, unsigned v) { return rotvar_emu_atomic_cas(p, c, v); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c, unsigned long long v) {
    return rotvar_emu_atomic_cas(p, c, v);
}
inline int atomicExch(int* p, int v) { return ROTVAR_EMU_AREF(int, p).exchange(v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return ROTVAR_EMU_AREF(unsigned, p).exchange(v); }
inline float atomicExch(float* p, float v) { return ROTVAR_EMU_AREF(float, p).exchange(v); }

// ---------------------------------------------------------------------- math
// Fast intrinsics map to the accurate libm versions: tests compare against
// references with tolerances that also cover the GPU's approximations.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double x) { return sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float2int_rn(float x) { return int(nearbyintf(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline float __int2float_rn(int x) { return float(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }

template <class T>
inline T __ldg(const T* p) { return *p; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
