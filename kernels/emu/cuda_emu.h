// Host emulation of the CUDA execution model, force-included (g++ -include)
// into every kernels/*.cu by build.rs so the exact source nvcc compiles can
// run on a CPU-only machine. See README.md in this directory for the design
// and its limits. Everything is `inline` because the header is compiled into
// several translation units that must share one runtime.
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
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time and launches are serialised, so one static
// instance per declaration behaves exactly like per-block shared memory.
#define __shared__ static
#define ROTVAR_DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::rotvar_emu::dyn_shared())

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

// Barrier whose participant count can shrink mid-phase (arrive_and_drop),
// because a CUDA thread that has returned no longer holds up __syncthreads.
// Lock-free: with up to 1024 host threads on a few cores, a mutex here
// convoys behind preempted holders.
class Barrier {
  public:
    void reset(int n) { state_.store(pack(unsigned(n), unsigned(n)), std::memory_order_relaxed); }
    template <class F>
    void arrive_and_wait(F&& on_complete) {
        // Read before arriving: the phase cannot complete without us.
        const uint32_t g = gen_.load(std::memory_order_acquire);
        if (arrive(false)) {
            on_complete();
            release(g);
            return;
        }
        for (int i = 0; i < 64; ++i)
            if (gen_.load(std::memory_order_acquire) != g) return;
        while (gen_.load(std::memory_order_acquire) == g) gen_.wait(g, std::memory_order_acquire);
    }
    void arrive_and_drop(std::atomic<uint64_t>& progress) {
        const uint32_t g = gen_.load(std::memory_order_acquire);
        if (arrive(true)) {
            progress.fetch_add(1, std::memory_order_relaxed);
            release(g);
        }
    }
    int remaining() const { return int(uint32_t(state_.load(std::memory_order_relaxed))); }

  private:
    static uint64_t pack(unsigned expected, unsigned remaining) { return (uint64_t(expected) << 32) | remaining; }
    // Counts one arrival (and, if `drop`, one fewer participant from now on).
    // Returns true for the arrival that completes the phase; it re-arms the
    // count before anyone can arrive for the next phase.
    bool arrive(bool drop) {
        uint64_t s = state_.load(std::memory_order_relaxed);
        for (;;) {
            const unsigned exp = unsigned(s >> 32) - (drop ? 1u : 0u), rem = unsigned(s);
            const uint64_t next = rem == 1 ? pack(exp, exp) : pack(exp, rem - 1);
            if (state_.compare_exchange_weak(s, next, std::memory_order_acq_rel, std::memory_order_relaxed))
                return rem == 1;
        }
    }
    void release(uint32_t g) {
        gen_.store(g + 1, std::memory_order_release);
        gen_.notify_all();
    }
    std::atomic<uint64_t> state_{0};  // expected << 32 | remaining
    std::atomic<uint32_t> gen_{0};
};

constexpr size_t kGatherBytes = 256;  // max per-lane payload of warp_allgather

struct Runtime {
    const char* kernel = "";
    dim3 grid, block;
    unsigned nthreads = 0, nwarps = 0;
    uint64_t nblocks = 0;
    Barrier block_bar, end_bar;
    std::unique_ptr<Barrier[]> warp_bar;
    // Two slot banks per warp so a collective needs a single barrier: a lane
    // can only rewrite bank p after every lane passed the barrier of the
    // collective in between, i.e. after all reads of bank p finished.
    std::vector<uint64_t> shfl;     // [warp][bank][lane]
    std::vector<unsigned char> gather;  // [warp][bank][lane][kGatherBytes]
    unsigned char* dyn = nullptr;
    size_t dyn_bytes = 0;
    std::atomic<uint64_t> progress{0};
    std::atomic<uint64_t> cur_block{0};
    std::atomic<bool> trapped{false};
    std::mutex done_m;
    std::condition_variable done_cv;
    unsigned finished = 0;  // guarded by done_m
};

// Thrown by __trap(): unwinds only the trapping CUDA thread, which then
// counts as exited, and the launch reports an error instead of killing the
// test process (on a GPU the launch fails with an error too).
struct Trap {};

inline Runtime* g_rt = nullptr;
inline thread_local unsigned t_tid, t_warp, t_lane, t_bank;

inline unsigned char* dyn_shared() { return g_rt->dyn; }

inline std::string& last_error() {
    static thread_local std::string e;
    return e;
}

inline unsigned warp_lanes(const Runtime& rt, unsigned w) {
    unsigned rest = rt.nthreads - w * 32;
    return rest < 32 ? rest : 32;
}

inline void sync_block() {
    Runtime& rt = *g_rt;
    rt.block_bar.arrive_and_wait([&] { rt.progress.fetch_add(1, std::memory_order_relaxed); });
}

inline void sync_warp() {
    Runtime& rt = *g_rt;
    rt.warp_bar[t_warp].arrive_and_wait([&] { rt.progress.fetch_add(1, std::memory_order_relaxed); });
}

// One warp-collective step: publish `mine`, wait for the warp, read lane `src`.
template <class T>
inline T warp_exchange(T mine, unsigned src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle payload");
    Runtime& rt = *g_rt;
    uint64_t* bank = &rt.shfl[(size_t(t_warp) * 2 + t_bank) * 32];
    t_bank ^= 1;
    uint64_t raw = 0;
    memcpy(&raw, &mine, sizeof(T));
    bank[t_lane] = raw;
    sync_warp();
    T out;
    memcpy(&out, &bank[src], sizeof(T));
    return out;
}

// Every lane receives every lane's value; the building block for emulated
// twins of warp-wide instructions such as mma.sync (see README.md).
template <class T>
inline void warp_allgather(const T& mine, T (&all)[32]) {
    static_assert(sizeof(T) <= kGatherBytes && std::is_trivially_copyable<T>::value, "gather payload");
    Runtime& rt = *g_rt;
    unsigned char* bank = &rt.gather[(size_t(t_warp) * 2 + t_bank) * 32 * kGatherBytes];
    t_bank ^= 1;
    memcpy(bank + t_lane * kGatherBytes, &mine, sizeof(T));
    sync_warp();
    unsigned n = warp_lanes(rt, t_warp);
    for (unsigned l = 0; l < 32; ++l) {
        if (l < n) memcpy(&all[l], bank + l * kGatherBytes, sizeof(T));
        else all[l] = T{};
    }
}

// One CUDA thread's share of a launch: every block, in order.
inline void run_thread(Runtime* rt, unsigned t, const std::function<void()>* body) {
    const dim3 b = rt->block, g = rt->grid;
    threadIdx = {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
    blockDim = b;
    gridDim = g;
    t_tid = t;
    t_warp = t / 32;
    t_lane = t % 32;
    for (uint64_t blk = 0; blk < rt->nblocks; ++blk) {
        blockIdx = {unsigned(blk % g.x), unsigned((blk / g.x) % g.y), unsigned(blk / (uint64_t(g.x) * g.y))};
        t_bank = 0;
        try {
            (*body)();
        } catch (const Trap&) {
            rt->trapped.store(true, std::memory_order_relaxed);
        }
        rt->block_bar.arrive_and_drop(rt->progress);
        rt->warp_bar[t_warp].arrive_and_drop(rt->progress);
        rt->end_bar.arrive_and_wait([&] {
            rt->block_bar.reset(int(rt->nthreads));
            for (unsigned w = 0; w < rt->nwarps; ++w) rt->warp_bar[w].reset(int(warp_lanes(*rt, w)));
            // Poison: CUDA never zeroes shared memory between blocks.
            if (rt->dyn_bytes) memset(rt->dyn, 0xff, rt->dyn_bytes);
            rt->cur_block.store(blk + 1, std::memory_order_relaxed);
            rt->progress.fetch_add(1, std::memory_order_relaxed);
        });
    }
    // Under the lock: once the launcher sees the count complete it frees rt,
    // so the last worker must not touch rt after releasing done_m.
    std::lock_guard<std::mutex> l(rt->done_m);
    if (++rt->finished == rt->nthreads) rt->done_cv.notify_all();
}

// Host threads persist across launches: creating 1024 OS threads costs
// ~80 ms on a small machine, far more than most emulated kernels run.
// Thread i plays CUDA thread i of whichever launch is current. The pool is
// leaked on purpose; idle workers just sleep until the process exits.
struct Pool {
    // epoch << 16 | threads of the current launch, published after job/body.
    std::atomic<uint64_t> ticket{0};
    std::atomic<Runtime*> job{nullptr};
    std::atomic<const std::function<void()>*> body{nullptr};
    uint64_t epoch = 0;               // launcher only (under launch_mutex)
    std::vector<std::thread> threads;  // launcher only
};

inline Pool& pool() {
    static Pool* p = new Pool;
    return *p;
}

inline void pool_worker(unsigned t) {
    Pool& p = pool();
    uint64_t seen = 0;
    for (;;) {
        const uint64_t tk = p.ticket.load(std::memory_order_acquire);
        if ((tk >> 16) == seen) {
            p.ticket.wait(tk, std::memory_order_acquire);
            continue;
        }
        seen = tk >> 16;
        // Only participants touch the job: the launch cannot finish, and the
        // next one cannot be published, before they are done with it.
        if (t < (tk & 0xffff))
            run_thread(p.job.load(std::memory_order_relaxed), t, p.body.load(std::memory_order_relaxed));
    }
}

inline std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

inline double watchdog_seconds() {
    const char* s = getenv("ROTVAR_EMU_TIMEOUT_S");
    double v = s ? atof(s) : 0.0;
    return v > 0 ? v : 120.0;
}

// Runs `body` once per CUDA thread of every block. Returns 0, or 1 with
// last_error() set. A kernel that stops making progress (divergent barrier)
// aborts the process with a diagnostic instead of hanging CI forever.
inline int launch(const EmuLaunch* cfg, const char* name, std::function<void()> body) {
    try {
        std::lock_guard<std::mutex> serial(launch_mutex());
        const dim3 grid(cfg->grid[0], cfg->grid[1], cfg->grid[2]);
        const dim3 block(cfg->block[0], cfg->block[1], cfg->block[2]);
        const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
        const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
        if (nthreads == 0 || nthreads > 1024 || nblocks == 0) {
            last_error() = std::string("emulated launch of ") + name + ": bad grid/block dimensions";
            return 1;
        }
        Runtime rt;
        rt.kernel = name;
        rt.grid = grid;
        rt.block = block;
        rt.nthreads = unsigned(nthreads);
        rt.nwarps = unsigned((nthreads + 31) / 32);
        rt.nblocks = nblocks;
        rt.block_bar.reset(int(nthreads));
        rt.end_bar.reset(int(nthreads));
        rt.warp_bar.reset(new Barrier[rt.nwarps]);
        for (unsigned w = 0; w < rt.nwarps; ++w) rt.warp_bar[w].reset(int(warp_lanes(rt, w)));
        rt.shfl.assign(size_t(rt.nwarps) * 2 * 32, 0);
        rt.gather.assign(size_t(rt.nwarps) * 2 * 32 * kGatherBytes, 0);
        std::vector<unsigned char> dyn_store;
        if (cfg->shared_bytes) {
            rt.dyn_bytes = cfg->shared_bytes;
            dyn_store.resize(rt.dyn_bytes + 128);
            rt.dyn = dyn_store.data() + (128 - reinterpret_cast<uintptr_t>(dyn_store.data()) % 128) % 128;
            memset(rt.dyn, 0xff, rt.dyn_bytes);
        }
        Pool& p = pool();
        try {
            while (p.threads.size() < nthreads) p.threads.emplace_back(pool_worker, unsigned(p.threads.size()));
        } catch (const std::exception& e) {
            last_error() = std::string("emulated launch of ") + name + ": cannot start threads: " + e.what();
            return 1;
        }
        g_rt = &rt;
        p.job.store(&rt, std::memory_order_relaxed);
        p.body.store(&body, std::memory_order_relaxed);
        p.ticket.store((++p.epoch << 16) | rt.nthreads, std::memory_order_release);
        p.ticket.notify_all();
        {
            const double limit = watchdog_seconds();
            std::unique_lock<std::mutex> l(rt.done_m);
            uint64_t seen = rt.progress.load();
            auto last = std::chrono::steady_clock::now();
            while (rt.finished < nthreads) {
                rt.done_cv.wait_for(l, std::chrono::milliseconds(200));
                const uint64_t prog = rt.progress.load();
                const auto now = std::chrono::steady_clock::now();
                if (prog != seen) {
                    seen = prog;
                    last = now;
                } else if (std::chrono::duration<double>(now - last).count() > limit) {
                    fprintf(stderr,
                            "rotvar emu: kernel %s made no progress for %.0fs in block %llu of %llu "
                            "(%d threads still owe __syncthreads): a barrier or warp collective is "
                            "probably reached by only part of the block/warp. Aborting.\n",
                            name, limit, (unsigned long long)rt.cur_block.load(),
                            (unsigned long long)nblocks, rt.block_bar.remaining());
                    fflush(stderr);
                    abort();
                }
            }
        }
        g_rt = nullptr;
        if (rt.trapped.load()) {
            last_error() = std::string("emulated kernel ") + name + " executed __trap() (unsupported launch configuration?)";
            return 1;
        }
        return 0;
    } catch (const std::exception& e) {
        g_rt = nullptr;
        last_error() = std::string("emulated launch of ") + name + ": " + e.what();
        return 1;
    }
}

}  // namespace rotvar_emu

// ------------------------------------------------------------ synchronisation
inline void __syncthreads() { rotvar_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { rotvar_emu::sync_warp(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { throw rotvar_emu::Trap{}; }

// Masks are not interpreted: every live lane of the warp must take part
// (see README.md). Out-of-segment sources return the caller's own value,
// as on hardware.
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    unsigned lane = rotvar_emu::t_lane;
    unsigned base = lane & ~unsigned(width - 1);
    return rotvar_emu::warp_exchange(v, base + (unsigned(src) & unsigned(width - 1)));
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    unsigned lane = rotvar_emu::t_lane;
    unsigned seg = lane & unsigned(width - 1);
    return rotvar_emu::warp_exchange(v, seg + delta < unsigned(width) ? lane + delta : lane);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    unsigned lane = rotvar_emu::t_lane;
    unsigned seg = lane & unsigned(width - 1);
    return rotvar_emu::warp_exchange(v, seg >= delta ? lane - delta : lane);
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    unsigned lane = rotvar_emu::t_lane;
    unsigned src = lane ^ unsigned(mask);
    unsigned seg_end = (lane & ~unsigned(width - 1)) + unsigned(width);
    return rotvar_emu::warp_exchange(v, src < seg_end ? src : lane);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    int all[32];
    rotvar_emu::warp_allgather(pred, all);
    unsigned m = 0;
    for (unsigned l = 0; l < 32; ++l) m |= (all[l] ? 1u : 0u) << l;
    return m;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    unsigned n = rotvar_emu::warp_lanes(*rotvar_emu::g_rt, rotvar_emu::t_warp);
    unsigned live = n == 32 ? 0xffffffffu : ((1u << n) - 1);
    return (__ballot_sync(mask, pred) & live) == live;
}

// ------------------------------------------------------------------- atomics
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
