// The host emulator's runtime: device memory, the thread pool and block
// scheduler behind a launch, barriers and warp collectives, and the sanitizer
// (memcheck, initcheck, racecheck, synccheck). Compiled WITHOUT
// -fsanitize=thread: it implements the __tsan_* hooks that the instrumented
// kernels call. README.md in this directory explains the design.
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

// Last: its macros (__noinline__, ...) would break the standard headers.
#include "cuda_emu.h"

namespace rotvar_emu {
namespace {

// ------------------------------------------------------------------ settings

double env_num(const char* name, double dflt) {
    const char* s = getenv(name);
    if (!s || !*s) return dflt;
    char* end = nullptr;
    double v = strtod(s, &end);
    return end && *end == 0 ? v : dflt;
}

// Blocks of one launch that run at the same time (ROTVAR_EMU_SLOTS, default 2).
unsigned slot_setting() {
    static unsigned v = unsigned(std::clamp(env_num("ROTVAR_EMU_SLOTS", 2), 1.0, 8.0));
    return v;
}
bool racecheck_setting() {
    static bool v = env_num("ROTVAR_EMU_RACECHECK", 1) != 0;
    return v;
}

const size_t kPage = size_t(sysconf(_SC_PAGESIZE));
size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// -------------------------------------------------------------- shadow cells
// One cell per 4-byte granule of device and shared memory: the last write and
// the last read, each stamped with the launch, block, thread and how many
// block barriers (and warp syncs) that thread had passed. Two stamps of one
// launch are ordered iff they are the same thread, or a barrier both threads
// take part in lies between them; stamps of earlier launches are ordered.
struct Stamp {
    uint32_t launch;  // 0: never
    uint32_t block;
    uint32_t bsync;
    uint16_t tid;
    uint16_t wsync;
};
constexpr uint16_t kMulti = 0x8000;  // in Cell::r.tid: several threads read in this phase
struct Cell {
    Stamp w, r;
};

struct Alloc {
    uintptr_t map_lo, map_hi;    // whole mapping, guard pages included
    uintptr_t zone_lo, zone_hi;  // between the guard pages: red zones and data
    uintptr_t data;
    size_t bytes;
    Cell* shadow;  // one per granule of the data, lazily backed (MAP_NORESERVE)
    size_t shadow_bytes;
};

// Every live device allocation, by data address.
std::mutex g_alloc_m;
std::map<uintptr_t, Alloc> g_allocs;

constexpr size_t kRedZone = 256;  // cudaMalloc aligns to 256 bytes; so does data here

void* map_or_null(size_t bytes, int prot, bool noreserve) {
    void* p = mmap(nullptr, bytes, prot, MAP_PRIVATE | MAP_ANONYMOUS | (noreserve ? MAP_NORESERVE : 0), -1, 0);
    return p == MAP_FAILED ? nullptr : p;
}

// ------------------------------------------------------------------- barriers

// Barrier whose participant count can shrink mid-phase (arrive_and_drop),
// because a CUDA thread that has returned no longer holds up __syncthreads.
// Lock-free: with hundreds of host threads on a few cores, a mutex here
// convoys behind preempted holders. `waiting` (shared by a block's barriers)
// counts threads parked in an incomplete phase: synccheck's deadlock test.
class Barrier {
  public:
    void reset(int n) {
        state_.store(pack(unsigned(n), unsigned(n)), std::memory_order_relaxed);
    }
    // Returns false when the launch was aborted while waiting.
    template <class F>
    bool arrive_and_wait(std::atomic<int>& waiting, const std::atomic<bool>& abort, F&& on_complete) {
        const uint32_t g = gen_.load(std::memory_order_acquire);
        waiting.fetch_add(1, std::memory_order_acq_rel);
        unsigned parked;
        if (arrive(false, &parked)) {
            on_complete();
            waiting.fetch_sub(int(parked) + 1, std::memory_order_acq_rel);
            release(g);
            return true;
        }
        for (int i = 0; i < 64; ++i)
            if (gen_.load(std::memory_order_acquire) != g) return !abort.load(std::memory_order_relaxed);
        while (gen_.load(std::memory_order_acquire) == g) gen_.wait(g, std::memory_order_acquire);
        return !abort.load(std::memory_order_relaxed);
    }
    template <class F>
    void arrive_and_drop(std::atomic<int>& waiting, F&& on_complete) {
        const uint32_t g = gen_.load(std::memory_order_acquire);
        unsigned parked;
        if (arrive(true, &parked)) {
            on_complete();
            waiting.fetch_sub(int(parked), std::memory_order_acq_rel);
            release(g);
        }
    }
    // Wakes every waiter (after the launch set its abort flag).
    void wake_all() {
        gen_.fetch_add(1, std::memory_order_acq_rel);
        gen_.notify_all();
    }
    // Threads waiting in the current phase.
    unsigned arrived() const {
        const uint64_t s = state_.load(std::memory_order_relaxed);
        return unsigned(s >> 32) - unsigned(s);
    }

  private:
    static uint64_t pack(unsigned expected, unsigned remaining) { return (uint64_t(expected) << 32) | remaining; }
    // Counts one arrival (and, if `drop`, one fewer participant from now on).
    // Returns true for the arrival that completes the phase (and in *parked
    // how many others were waiting); it re-arms the count first.
    bool arrive(bool drop, unsigned* parked) {
        uint64_t s = state_.load(std::memory_order_relaxed);
        for (;;) {
            const unsigned exp0 = unsigned(s >> 32), rem = unsigned(s);
            const unsigned exp = exp0 - (drop ? 1u : 0u);
            const uint64_t next = rem == 1 ? pack(exp, exp) : pack(exp, rem - 1);
            if (state_.compare_exchange_weak(s, next, std::memory_order_acq_rel, std::memory_order_relaxed)) {
                *parked = exp0 - rem;  // arrived before us in this phase
                return rem == 1;
            }
        }
    }
    void release(uint32_t g) {
        gen_.store(g + 1, std::memory_order_release);
        gen_.notify_all();
    }
    std::atomic<uint64_t> state_{0};  // expected << 32 | remaining
    std::atomic<uint32_t> gen_{0};
};

// ------------------------------------------------------------------- runtime

constexpr size_t kStaticShared = 48 * 1024;        // the static __shared__ limit per block
constexpr size_t kMaxShared = 227 * 1024;          // static + dynamic, opt-in limit on sm_90
constexpr size_t kArenaBytes = kStaticShared + kMaxShared;

struct Runtime;

struct StaticVar {
    const void* tag;
    size_t offset, bytes;
    const char* name;
};

// One block in flight: its threads, barriers, collectives and shared memory.
struct Slot {
    uint64_t block = 0;  // linear block index now running
    Barrier block_bar, end_bar;
    std::unique_ptr<Barrier[]> warp_bar;
    std::atomic<int> waiting{0};      // parked in block_bar or a warp_bar
    std::atomic<int> end_waiting{0};  // returned threads waiting for the next block
    std::atomic<int> exited{0};
    // Warp collectives: two banks per warp so a collective needs one barrier.
    std::vector<unsigned char> gather;      // [warp][bank][lane][kGatherBytes]
    std::vector<const char*> warp_site;     // [warp][bank][lane]: where each lane is
    std::vector<unsigned> warp_mask;        // [warp][bank][lane]
    std::unique_ptr<std::atomic<unsigned>[]> warp_exited;  // [warp]: lanes that returned
    // synccheck of __syncthreads: the site of the first arrival in this phase.
    std::atomic<const char*> bar_site{nullptr};
    // Shared memory: [static area | dynamic area], between guard pages.
    unsigned char* arena = nullptr;
    Cell* arena_shadow = nullptr;
    std::atomic_flag statics_lock = ATOMIC_FLAG_INIT;
    std::vector<StaticVar> statics;
    size_t static_used = 0;
};

// One cp.async of a thread, issued and not yet landed.
struct AsyncCopy {
    unsigned char* dst;
    const unsigned char* src;
    unsigned bytes, src_bytes;
};

struct ThreadCtx {
    Runtime* rt;
    Slot* slot;
    unsigned tid, warp, lane, bank;
    uint32_t bsync, wsync;
    const Alloc* last;  // the allocation the previous access hit
    // cp.async: copies issued since the last commit, and the committed groups, oldest first.
    std::vector<AsyncCopy> open;
    std::vector<std::vector<AsyncCopy>> groups;
};

struct Report {
    std::string key, text;
};

struct Runtime {
    const char* kernel = "";
    dim3 grid, block;
    unsigned nthreads = 0, nwarps = 0, nslots = 0;
    uint64_t nblocks = 0;
    uint32_t launch_id = 0;
    uint64_t order_a = 1, order_b = 0;  // block k runs as (a*k + b) mod nblocks
    std::atomic<uint64_t> next_block{0};
    size_t dyn_bytes = 0;
    bool racecheck = true;
    std::vector<Slot> slots;
    std::vector<ThreadCtx> ctxs;
    std::vector<Alloc> allocs;  // snapshot, sorted by zone_lo
    const char* const* ptr_names = nullptr;
    const void* const* ptrs = nullptr;
    unsigned nptrs = 0;
    std::atomic<uint64_t> progress{0};
    std::atomic<bool> abort{false};
    std::atomic<bool> trapped{false};
    std::mutex report_m;
    std::vector<Report> reports;
    unsigned dropped_reports = 0;
    std::mutex done_m;
    std::condition_variable done_cv;
    unsigned finished = 0;  // guarded by done_m
};

std::atomic<Runtime*> g_rt{nullptr};
thread_local ThreadCtx* t_ctx = nullptr;
std::atomic<uint32_t> g_launch_counter{0};

std::string& last_error_str() {
    static thread_local std::string e;
    return e;
}

// Thrown to unwind one emulated CUDA thread: __trap(), or an aborted launch.
struct Unwind {};

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

void report(Runtime& rt, const std::string& key, const std::string& text) {
    std::lock_guard<std::mutex> l(rt.report_m);
    for (const Report& r : rt.reports)
        if (r.key == key) return;
    if (rt.reports.size() >= 8) {
        ++rt.dropped_reports;
        return;
    }
    rt.reports.push_back({key, text});
}

std::string thread_name(const Runtime& rt, uint64_t block, unsigned tid) {
    const dim3 b = rt.block, g = rt.grid;
    return fmt("thread (%u,%u,%u) of block (%llu,%llu,%llu)", tid % b.x, (tid / b.x) % b.y, tid / (b.x * b.y),
               (unsigned long long)(block % g.x), (unsigned long long)((block / g.x) % g.y),
               (unsigned long long)(block / (uint64_t(g.x) * g.y)));
}

// The kernel parameters whose pointers lie in allocation `a`.
std::string buffer_name(const Runtime& rt, const Alloc& a) {
    std::string names;
    for (unsigned i = 0; i < rt.nptrs; ++i) {
        const uintptr_t p = reinterpret_cast<uintptr_t>(rt.ptrs[i]);
        if (p >= a.zone_lo && p < a.zone_hi) names += (names.empty() ? "`" : ", `") + std::string(rt.ptr_names[i]) + "`";
    }
    if (names.empty()) return fmt("a device buffer of %zu bytes that is not a kernel argument", a.bytes);
    return fmt("argument %s (a buffer of %zu bytes)", names.c_str(), a.bytes);
}

const Alloc* find_alloc(const Runtime& rt, uintptr_t a) {
    auto it = std::upper_bound(rt.allocs.begin(), rt.allocs.end(), a,
                               [](uintptr_t v, const Alloc& al) { return v < al.zone_lo; });
    if (it == rt.allocs.begin()) return nullptr;
    --it;
    return a < it->zone_hi ? &*it : nullptr;
}

const Alloc* find_mapping(const Runtime& rt, uintptr_t a) {
    for (const Alloc& al : rt.allocs)
        if (a >= al.map_lo && a < al.map_hi) return &al;
    return nullptr;
}

// ------------------------------------------------------------------ sanitizer

// Striped locks make the read-check-update of one shadow cell atomic.
std::atomic_flag g_cell_locks[1024];

struct CellLock {
    std::atomic_flag& f;
    explicit CellLock(const void* cell) : f(g_cell_locks[(reinterpret_cast<uintptr_t>(cell) >> 5) & 1023]) {
        while (f.test_and_set(std::memory_order_acquire)) {}
    }
    ~CellLock() { f.clear(std::memory_order_release); }
};

// Is `s` concurrent with the current thread's access: no barrier orders them?
// Shared memory belongs to one block, so stamps of another block are from an
// earlier instance of the arena, never concurrent.
bool concurrent(const Stamp& s, const ThreadCtx& c, bool shared) {
    if (s.launch != c.rt->launch_id) return false;
    const uint64_t blk = c.slot->block;
    if (s.block != uint32_t(blk)) return !shared;
    if (s.bsync != c.bsync) return false;
    const unsigned tid = s.tid & ~kMulti;
    if (tid == c.tid && !(s.tid & kMulti)) return false;
    if (tid / 32 == c.warp && s.wsync != c.wsync && !(s.tid & kMulti)) return false;
    return true;
}

Stamp stamp(const ThreadCtx& c) {
    return Stamp{c.rt->launch_id, uint32_t(c.slot->block), c.bsync, uint16_t(c.tid), uint16_t(c.wsync)};
}

void race(ThreadCtx& c, const char* what, const Stamp& other, const std::string& where, const std::string& key) {
    Runtime& rt = *c.rt;
    const unsigned otid = other.tid & ~kMulti;
    std::string who = (other.tid & kMulti) ? "several threads" : thread_name(rt, other.block, otid);
    const char* gap = other.block != uint32_t(c.slot->block) ? "in another block of the same launch"
                                                             : "with no barrier in between";
    report(rt, key,
           fmt("racecheck: %s hazard on %s: %s and %s %s", what, where.c_str(),
               thread_name(rt, c.slot->block, c.tid).c_str(), who.c_str(), gap));
}

// One granule's hazard check and update. `init` (shared memory only): a read
// of a granule no thread of this block wrote is an uninitialised read.
template <class Where>  // a template, not std::function: this runs on every access
void check_cell(ThreadCtx& c, Cell* cell, bool write, bool shared, const Where& where) {
    CellLock l(cell);
    const Stamp me = stamp(c);
    if (write) {
        if (concurrent(cell->w, c, shared)) race(c, "write-after-write", cell->w, where(), "ww" + where());
        else if (concurrent(cell->r, c, shared)) race(c, "write-after-read", cell->r, where(), "wr" + where());
        cell->w = me;
        return;
    }
    if (shared && (cell->w.launch != me.launch || cell->w.block != me.block)) {
        report(*c.rt, "init" + where(),
               fmt("initcheck: %s read %s before any thread of its block wrote it",
                   thread_name(*c.rt, c.slot->block, c.tid).c_str(), where().c_str()));
    } else if (concurrent(cell->w, c, shared)) {
        race(c, "read-after-write", cell->w, where(), "rw" + where());
    }
    if (concurrent(cell->r, c, shared)) cell->r.tid |= kMulti;
    else cell->r = me;
}

std::string shared_name(const Slot& s, size_t off) {
    if (off >= kStaticShared) return fmt("dynamic shared memory, byte %zu", off - kStaticShared);
    for (const StaticVar& v : s.statics)
        if (off >= v.offset && off < v.offset + v.bytes)
            return fmt("shared `%s`, byte %zu", v.name, off - v.offset);
    return fmt("static shared memory, byte %zu", off);
}

// Every load and store of an emulated kernel comes here first.
void access(const void* p, size_t n, bool write, bool atomic) {
    ThreadCtx* c = t_ctx;
    if (!c) return;
    Runtime& rt = *c->rt;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    Slot& s = *c->slot;
    const uintptr_t arena = reinterpret_cast<uintptr_t>(s.arena);
    if (a - arena < kArenaBytes) {
        const size_t off = a - arena;
        const bool in_static = off + n <= s.static_used;
        const bool in_dyn = off >= kStaticShared && off + n <= kStaticShared + rt.dyn_bytes;
        if (!in_static && !in_dyn) {
            report(rt, fmt("smem-oob%zu", off / 64),
                   fmt("memcheck: %s %s %zu bytes of shared memory at offset %zu, outside the block's %zu static "
                       "and %zu dynamic bytes",
                       thread_name(rt, s.block, c->tid).c_str(), write ? "wrote" : "read", n,
                       off >= kStaticShared ? off - kStaticShared : off, s.static_used, rt.dyn_bytes));
            return;
        }
        if (!rt.racecheck || atomic) return;
        for (size_t g = off / 4; g <= (off + n - 1) / 4; ++g)
            check_cell(*c, &s.arena_shadow[g], write, true, [&] { return shared_name(s, g * 4); });
        return;
    }
    const Alloc* al = c->last;
    if (!al || a - al->zone_lo >= al->zone_hi - al->zone_lo) {
        al = find_alloc(rt, a);
        if (!al) return;  // the stack, the emulator's own memory, ...
        c->last = al;
    }
    if (a < al->data || a + n > al->data + al->bytes) {
        const bool before = a < al->data;
        const size_t dist = before ? al->data - a : a + n - (al->data + al->bytes);
        report(rt, fmt("oob%llx%d", (unsigned long long)al->data, int(before)),
               fmt("memcheck: %s %s %zu bytes %s %s of %s (the access reaches %zu bytes %s it)",
                   thread_name(rt, s.block, c->tid).c_str(), write ? "wrote" : "read", n,
                   before ? "before" : "past", before ? "the start" : "the end", buffer_name(rt, *al).c_str(),
                   dist, before ? "before" : "beyond"));
        return;
    }
    if (!rt.racecheck || atomic) return;
    const size_t off = a - al->data;
    for (size_t g = off / 4; g <= (off + n - 1) / 4; ++g)
        check_cell(*c, &al->shadow[g], write, false,
                   [&] { return fmt("%s, bytes %zu..%zu", buffer_name(rt, *al).c_str(), g * 4, g * 4 + 3); });
}

// -------------------------------------------------------- memcheck: guard pages

struct sigaction g_old_segv;

// Guard pages the SIGSEGV handler opened during the current launch.
struct Opened {
    void* page;
    uintptr_t data;
};
constexpr unsigned kMaxOpened = 64;
Opened g_opened[kMaxOpened];
std::atomic<unsigned> g_opened_n{0};

void on_segv(int sig, siginfo_t* info, void* uctx) {
    Runtime* rt = g_rt.load(std::memory_order_acquire);
    const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
    const Alloc* al = (rt && t_ctx) ? find_mapping(*rt, a) : nullptr;
    if (al && (a < al->zone_lo || a >= al->zone_hi)) {
        bool write = false;
#if defined(__x86_64__)
        write = (static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#endif
        const bool before = a < al->zone_lo;
        report(*rt, fmt("guard%llx%d", (unsigned long long)al->data, int(before)),
               fmt("memcheck: %s %s %s guard page %zu bytes %s %s of %s",
                   thread_name(*rt, t_ctx->slot->block, t_ctx->tid).c_str(), write ? "wrote" : "read",
                   before ? "the leading" : "the trailing", before ? al->data - a : a - (al->data + al->bytes),
                   before ? "before" : "past", before ? "the start" : "the end", buffer_name(*rt, *al).c_str()));
        // Let the access complete inside the guard page; the launch fails afterwards and the
        // page is protected again.
        void* page = reinterpret_cast<void*>(a & ~(kPage - 1));
        const unsigned k = g_opened_n.fetch_add(1, std::memory_order_acq_rel);
        if (k < kMaxOpened && mprotect(page, kPage, PROT_READ | PROT_WRITE) == 0) {
            g_opened[k] = {page, al->data};
            return;
        }
    }
    // Not ours (e.g. Rust's stack-overflow guard): hand it on.
    if (g_old_segv.sa_flags & SA_SIGINFO) {
        g_old_segv.sa_sigaction(sig, info, uctx);
    } else if (g_old_segv.sa_handler != SIG_IGN && g_old_segv.sa_handler != SIG_DFL) {
        g_old_segv.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);  // the faulting access repeats and kills the process as usual
    }
}

void install_segv_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
    });
}

// Closes the guard pages the handler opened, where their buffer still exists (another thread
// may have freed it, and the address range may belong to a new mapping by now).
void reprotect_guards() {
    std::lock_guard<std::mutex> l(g_alloc_m);
    const unsigned n = std::min(g_opened_n.load(std::memory_order_acquire), kMaxOpened);
    for (unsigned k = 0; k < n; ++k)
        if (g_opened[k].page && g_allocs.count(g_opened[k].data)) mprotect(g_opened[k].page, kPage, PROT_NONE);
    for (unsigned k = 0; k < n; ++k) g_opened[k] = {};
    g_opened_n.store(0, std::memory_order_release);
}

// ------------------------------------------------------------ thread pool

// Host threads persist across launches: creating 1024 OS threads costs
// ~80 ms on a small machine, far more than most emulated kernels run.
// Thread i plays thread i % nthreads of slot i / nthreads.
struct Pool {
    std::atomic<uint64_t> ticket{0};  // epoch << 16 | threads of the current launch
    std::atomic<Runtime*> job{nullptr};
    const std::function<void()>* body = nullptr;
    uint64_t epoch = 0;
    std::vector<std::thread> threads;
};

Pool& pool() {
    static Pool* p = new Pool;  // leaked on purpose; idle workers sleep until exit
    return *p;
}

std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

unsigned warp_lanes(const Runtime& rt, unsigned w) {
    const unsigned rest = rt.nthreads - w * 32;
    return rest < 32 ? rest : 32;
}

void start_block(Runtime& rt, Slot& s, uint64_t k) {
    s.block = (rt.order_a * k + rt.order_b) % rt.nblocks;
    s.block_bar.reset(int(rt.nthreads));
    for (unsigned w = 0; w < rt.nwarps; ++w) {
        s.warp_bar[w].reset(int(warp_lanes(rt, w)));
        s.warp_exited[w].store(0, std::memory_order_relaxed);
    }
    s.exited.store(0, std::memory_order_relaxed);
    s.bar_site.store(nullptr, std::memory_order_relaxed);
    // Poison: CUDA never zeroes shared memory (0xff bytes are NaN as float).
    memset(s.arena, 0xff, kStaticShared + rt.dyn_bytes);
}

// A thread that returns with copies in flight: they would land in shared memory nobody reads
// (or, on hardware, in the next block's), which is always a bug in a main loop.
void cp_async_check_done(ThreadCtx& c) {
    size_t pending = c.open.size();
    for (const auto& g : c.groups) pending += g.size();
    if (pending && !c.rt->abort.load(std::memory_order_relaxed)) {
        report(*c.rt, "cp.async-pending",
               fmt("cp.async: %s returned with %zu copies not waited for (cp.async.wait_group)",
                   thread_name(*c.rt, c.slot->block, c.tid).c_str(), pending));
    }
    c.open.clear();
    c.groups.clear();
}

// One CUDA thread's share of a launch: blocks of its slot until none are left.
void run_thread(Runtime& rt, unsigned g, const std::function<void()>& body) {
    Slot& s = rt.slots[g / rt.nthreads];
    const unsigned t = g % rt.nthreads;
    ThreadCtx& c = rt.ctxs[g];
    c = ThreadCtx{&rt, &s, t, t / 32, t % 32, 0, 0, 0, nullptr, {}, {}};
    const dim3 b = rt.block, gd = rt.grid;
    threadIdx = {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
    blockDim = b;
    gridDim = gd;
    while (s.block < rt.nblocks) {
        const uint64_t blk = s.block;
        blockIdx = {unsigned(blk % gd.x), unsigned((blk / gd.x) % gd.y), unsigned(blk / (uint64_t(gd.x) * gd.y))};
        c.bank = 0;
        c.bsync = c.wsync = 0;
        if (!rt.abort.load(std::memory_order_relaxed)) {
            t_ctx = &c;
            bool unwound = false;
            try {
                body();
            } catch (const Unwind&) {
                unwound = true;
            }
            if (unwound) c.open.clear(), c.groups.clear();
            else cp_async_check_done(c);
            t_ctx = nullptr;
        }
        // Returned: this thread no longer holds up its block's or warp's barriers.
        s.warp_exited[c.warp].fetch_or(1u << c.lane, std::memory_order_acq_rel);
        s.exited.fetch_add(1, std::memory_order_acq_rel);
        s.block_bar.arrive_and_drop(s.waiting, [&] {
            s.bar_site.store(nullptr, std::memory_order_relaxed);
            rt.progress.fetch_add(1, std::memory_order_relaxed);
        });
        s.warp_bar[c.warp].arrive_and_drop(s.waiting, [&] { rt.progress.fetch_add(1, std::memory_order_relaxed); });
        static const std::atomic<bool> never{false};
        s.end_bar.arrive_and_wait(s.end_waiting, never, [&] {
            const uint64_t k = rt.next_block.fetch_add(1, std::memory_order_relaxed);
            if (k < rt.nblocks && !rt.abort.load(std::memory_order_relaxed)) start_block(rt, s, k);
            else s.block = rt.nblocks;  // done
            s.end_bar.reset(int(rt.nthreads));
            rt.progress.fetch_add(1, std::memory_order_relaxed);
        });
    }
    // Under the lock: once the launcher sees the count complete it frees rt.
    std::lock_guard<std::mutex> l(rt.done_m);
    if (++rt.finished == rt.nthreads * rt.nslots) rt.done_cv.notify_all();
}

void pool_worker(unsigned g) {
    Pool& p = pool();
    uint64_t seen = 0;
    for (;;) {
        const uint64_t tk = p.ticket.load(std::memory_order_acquire);
        if ((tk >> 16) == seen) {
            p.ticket.wait(tk, std::memory_order_acquire);
            continue;
        }
        seen = tk >> 16;
        if (g < (tk & 0xffff)) run_thread(*p.job.load(std::memory_order_relaxed), g, *p.body);
    }
}

uint64_t gcd(uint64_t a, uint64_t b) {
    while (b) {
        const uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

uint64_t splitmix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// synccheck: a deadlock is every live thread of a block parked in a barrier or
// collective that can no longer complete. Two looks 50 ms apart with no
// progress in between rule out a phase that is completing right now.
bool deadlocked(Runtime& rt, std::string* what) {
    for (Slot& s : rt.slots) {
        if (s.block >= rt.nblocks) continue;
        const int live = int(rt.nthreads) - s.exited.load(std::memory_order_acquire);
        if (live > 0 && s.waiting.load(std::memory_order_acquire) >= live) {
            const char* site = s.bar_site.load(std::memory_order_relaxed);
            const unsigned at_bar = s.block_bar.arrived();
            *what = fmt("synccheck: kernel %s deadlocked in block %llu: all %d live threads wait, %u at the "
                        "__syncthreads at %s and %d in warp collectives, for threads that never arrive. Every "
                        "thread of a block must reach the same barriers, every lane of a mask the same "
                        "collective.",
                        rt.kernel, (unsigned long long)s.block, live, at_bar, site ? site : "(none)",
                        live - int(at_bar));
            return true;
        }
    }
    return false;
}

void abort_launch(Runtime& rt) {
    rt.abort.store(true, std::memory_order_release);
    for (Slot& s : rt.slots) {
        s.block_bar.wake_all();
        for (unsigned w = 0; w < rt.nwarps; ++w) s.warp_bar[w].wake_all();
    }
}

}  // namespace

// ------------------------------------------------------------- device side

void sync_block(const char* site) {
    ThreadCtx& c = *t_ctx;
    Runtime& rt = *c.rt;
    Slot& s = *c.slot;
    if (rt.abort.load(std::memory_order_relaxed)) throw Unwind{};
    const char* first = nullptr;
    if (!s.bar_site.compare_exchange_strong(first, site, std::memory_order_acq_rel) && first != site &&
        strcmp(first, site) != 0) {
        report(rt, std::string("bar") + first + site,
               fmt("synccheck: divergent __syncthreads in block %llu: %s waits at %s while another thread of "
                   "its block waits at %s; every thread must reach the same barrier",
                   (unsigned long long)s.block, thread_name(rt, s.block, c.tid).c_str(), site, first));
    }
    const bool ok = s.block_bar.arrive_and_wait(s.waiting, rt.abort, [&] {
        s.bar_site.store(nullptr, std::memory_order_relaxed);
        rt.progress.fetch_add(1, std::memory_order_relaxed);
    });
    if (!ok) throw Unwind{};
    ++c.bsync;
}

void sync_warp() {
    ThreadCtx& c = *t_ctx;
    Runtime& rt = *c.rt;
    Slot& s = *c.slot;
    const bool ok = s.warp_bar[c.warp].arrive_and_wait(s.waiting, rt.abort, [&] {
        rt.progress.fetch_add(1, std::memory_order_relaxed);
    });
    if (!ok) throw Unwind{};
    ++c.wsync;
}

const unsigned char* warp_collective(const char* site, unsigned mask, const void* mine, size_t bytes) {
    ThreadCtx& c = *t_ctx;
    Runtime& rt = *c.rt;
    Slot& s = *c.slot;
    const size_t slot = (size_t(c.warp) * 2 + c.bank) * 32;
    unsigned char* bank = &s.gather[slot * kGatherBytes];
    c.bank ^= 1;
    memcpy(bank + c.lane * kGatherBytes, mine, bytes);
    s.warp_site[slot + c.lane] = site;
    s.warp_mask[slot + c.lane] = mask;
    const bool ok = s.warp_bar[c.warp].arrive_and_wait(s.waiting, rt.abort, [&] {
        // synccheck: one collective, and no lane of any mask gone.
        const unsigned n = warp_lanes(rt, c.warp);
        const unsigned gone = s.warp_exited[c.warp].load(std::memory_order_acquire);
        unsigned masks = 0;
        const char* other = nullptr;
        for (unsigned l = 0; l < n; ++l) {
            if (gone & (1u << l)) continue;
            masks |= s.warp_mask[slot + l];
            const char* ls = s.warp_site[slot + l];
            if (ls != site && strcmp(ls, site) != 0) other = ls;
        }
        if (other)
            report(rt, std::string("coll") + site + other,
                   fmt("synccheck: divergent warp collective in warp %u of block %llu: lanes meet at %s and at %s",
                       c.warp, (unsigned long long)s.block, site, other));
        if (masks & gone)
            report(rt, std::string("gone") + site,
                   fmt("synccheck: the warp collective at %s in warp %u of block %llu names lanes 0x%08x in its "
                       "mask that have already returned",
                       site, c.warp, (unsigned long long)s.block, masks & gone));
        rt.progress.fetch_add(1, std::memory_order_relaxed);
    });
    if (!ok) throw Unwind{};
    return bank;
}

unsigned warp_live_lanes() { return warp_lanes(*t_ctx->rt, t_ctx->warp); }
unsigned lane_id() { return t_ctx->lane; }

void* static_shared(const void* tag, size_t bytes, size_t align, const char* name) {
    ThreadCtx& c = *t_ctx;
    Slot& s = *c.slot;
    align = std::max<size_t>(align, 16);
    while (s.statics_lock.test_and_set(std::memory_order_acquire)) {}
    size_t off = SIZE_MAX;
    for (const StaticVar& v : s.statics)
        if (v.tag == tag) off = v.offset;
    if (off == SIZE_MAX) {
        off = round_up(s.static_used, align);
        if (off + bytes <= kStaticShared) {
            s.statics.push_back({tag, off, bytes, name});
            s.static_used = off + bytes;
        }
    }
    s.statics_lock.clear(std::memory_order_release);
    if (off + bytes > kStaticShared) {
        report(*c.rt, "static-too-big",
               fmt("static shared memory `%s` (%zu bytes) does not fit in the 48 KiB a block may declare "
                   "statically",
                   name, bytes));
        throw Unwind{};
    }
    return s.arena + off;
}

void* dyn_shared() { return t_ctx->slot->arena + kStaticShared; }

// cp.async. Both ends of a copy's window are made visible. At issue the destination is
// written with poison (0xff bytes: NaN), because the copy may land at any moment from then on:
// a read before the wait sees garbage, and a thread still reading the old contents in the
// same barrier interval races with the write. At the wait the data lands, written by this
// thread at its barrier count then: another thread that reads it before the next barrier
// races with it. The source is checked (and read) at issue and read again at the wait.
void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes, const char* site) {
    ThreadCtx& c = *t_ctx;
    Runtime& rt = *c.rt;
    Slot& s = *c.slot;
    const uintptr_t d = reinterpret_cast<uintptr_t>(dst), a = reinterpret_cast<uintptr_t>(src);
    const char* what = nullptr;
    if (d - reinterpret_cast<uintptr_t>(s.arena) >= kArenaBytes) what = "its destination is not shared memory";
    else if (bytes != 4 && bytes != 8 && bytes != 16) what = "it copies other than 4, 8 or 16 bytes";
    else if (src_bytes > bytes) what = "it reads more source bytes than it copies";
    else if (d % bytes || a % bytes) what = "an address is not aligned to the copy's size";
    if (what) {
        report(rt, fmt("cp.async%s", site),
               fmt("cp.async at %s: %s, %s (dst %p, src %p, %u of %u bytes)", site,
                   thread_name(rt, s.block, c.tid).c_str(), what, dst, src, src_bytes, bytes));
        throw Unwind{};
    }
    access(dst, bytes, true, false);
    if (src_bytes) {
        const Alloc* al = find_alloc(rt, a);
        access(src, src_bytes, false, false);
        if (al && (a < al->data || a + src_bytes > al->data + al->bytes)) src_bytes = 0;  // reported above
    }
    memset(dst, 0xff, bytes);
    c.open.push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), bytes, src_bytes});
}

void cp_async_commit() {
    ThreadCtx& c = *t_ctx;
    c.groups.push_back(std::move(c.open));
    c.open.clear();
}

void cp_async_wait(unsigned newest_pending) {
    ThreadCtx& c = *t_ctx;
    size_t done = 0;
    for (; c.groups.size() - done > newest_pending; ++done) {
        for (const AsyncCopy& k : c.groups[done]) {
            if (k.src_bytes) access(k.src, k.src_bytes, false, false);
            access(k.dst, k.bytes, true, false);
            memcpy(k.dst, k.src, k.src_bytes);
            memset(k.dst + k.src_bytes, 0, k.bytes - k.src_bytes);
        }
    }
    c.groups.erase(c.groups.begin(), c.groups.begin() + done);
}


void trap() {
    t_ctx->rt->trapped.store(true, std::memory_order_relaxed);
    throw Unwind{};
}

// Runs `body` once per CUDA thread of every block. Returns 0, or 1 with the
// error (and every sanitizer report) in last_error().
int launch(const EmuLaunch* cfg, const char* name, const char* const* ptr_names, const void* const* ptrs,
           unsigned nptrs, const std::function<void()>& body) {
    try {
        std::lock_guard<std::mutex> serial(launch_mutex());
        const dim3 grid(cfg->grid[0], cfg->grid[1], cfg->grid[2]);
        const dim3 block(cfg->block[0], cfg->block[1], cfg->block[2]);
        const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
        const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
        if (nthreads == 0 || nthreads > 1024 || nblocks == 0) {
            last_error_str() = std::string("emulated launch of ") + name + ": bad grid/block dimensions";
            return 1;
        }
        if (cfg->shared_bytes > kMaxShared) {
            last_error_str() = fmt("emulated launch of %s: %u bytes of dynamic shared memory; at most %zu", name,
                                   cfg->shared_bytes, kMaxShared);
            return 1;
        }
        install_segv_handler();
        auto rtp = std::make_unique<Runtime>();
        Runtime& rt = *rtp;
        rt.kernel = name;
        rt.grid = grid;
        rt.block = block;
        rt.nthreads = unsigned(nthreads);
        rt.nwarps = unsigned((nthreads + 31) / 32);
        rt.nblocks = nblocks;
        rt.nslots = unsigned(std::min<uint64_t>({nblocks, slot_setting(), std::max<uint64_t>(1, 4096 / nthreads)}));
        rt.dyn_bytes = cfg->shared_bytes;
        rt.racecheck = racecheck_setting();
        rt.launch_id = g_launch_counter.fetch_add(1) + 1;
        rt.ptr_names = ptr_names;
        rt.ptrs = ptrs;
        rt.nptrs = nptrs;
        // A different block order every launch (ROTVAR_EMU_SEED fixes the sequence).
        const uint64_t seed = splitmix(uint64_t(env_num("ROTVAR_EMU_SEED", 0)) * 1000003 + rt.launch_id);
        rt.order_b = seed % nblocks;
        rt.order_a = 1 + (seed >> 20) % nblocks;
        while (gcd(rt.order_a, nblocks) != 1) rt.order_a = rt.order_a % nblocks + 1;
        {
            std::lock_guard<std::mutex> l(g_alloc_m);
            rt.allocs.reserve(g_allocs.size());
            for (auto& kv : g_allocs) rt.allocs.push_back(kv.second);
        }
        std::sort(rt.allocs.begin(), rt.allocs.end(),
                  [](const Alloc& a, const Alloc& b) { return a.zone_lo < b.zone_lo; });
        for (unsigned i = 0; i < nptrs; ++i) {
            const uintptr_t p = reinterpret_cast<uintptr_t>(ptrs[i]);
            const Alloc* al = p ? find_alloc(rt, p) : nullptr;
            if (p && (!al || p < al->data || p > al->data + al->bytes)) {
                last_error_str() = fmt(
                    "emulated launch of %s: argument `%s` (0x%llx) does not point into device memory of the "
                    "emulator; allocate device buffers with emu::DeviceMem so the sanitizer can check them",
                    name, ptr_names[i], (unsigned long long)p);
                return 1;
            }
        }
        // Per-slot state.
        rt.slots = std::vector<Slot>(rt.nslots);
        for (unsigned si = 0; si < rt.nslots; ++si) {
            Slot& s = rt.slots[si];
            s.warp_bar.reset(new Barrier[rt.nwarps]);
            s.warp_exited.reset(new std::atomic<unsigned>[rt.nwarps]);
            s.gather.assign(size_t(rt.nwarps) * 2 * 32 * kGatherBytes, 0);
            s.warp_site.assign(size_t(rt.nwarps) * 2 * 32, "");
            s.warp_mask.assign(size_t(rt.nwarps) * 2 * 32, 0);
            s.end_bar.reset(int(rt.nthreads));
        }
        // Shared memory arenas (between guard pages) and their shadow, kept across launches.
        static std::vector<std::pair<unsigned char*, Cell*>> arenas;
        while (arenas.size() < rt.nslots) {
            const size_t span = round_up(kArenaBytes, kPage) + 2 * kPage;
            auto* m = static_cast<unsigned char*>(map_or_null(span, PROT_NONE, false));
            auto* sh = static_cast<Cell*>(
                map_or_null(kArenaBytes / 4 * sizeof(Cell), PROT_READ | PROT_WRITE, true));
            if (!m || !sh || mprotect(m + kPage, round_up(kArenaBytes, kPage), PROT_READ | PROT_WRITE) != 0) {
                last_error_str() = std::string("emulated launch of ") + name + ": cannot map shared memory";
                return 1;
            }
            arenas.push_back({m + kPage, sh});
        }
        for (unsigned si = 0; si < rt.nslots; ++si) {
            rt.slots[si].arena = arenas[si].first;
            rt.slots[si].arena_shadow = arenas[si].second;
            start_block(rt, rt.slots[si], rt.next_block.fetch_add(1));
        }
        rt.ctxs.resize(size_t(rt.nthreads) * rt.nslots);
        const unsigned total = rt.nthreads * rt.nslots;
        Pool& p = pool();
        try {
            while (p.threads.size() < total) p.threads.emplace_back(pool_worker, unsigned(p.threads.size()));
        } catch (const std::exception& e) {
            last_error_str() = std::string("emulated launch of ") + name + ": cannot start threads: " + e.what();
            return 1;
        }
        g_rt.store(&rt, std::memory_order_release);
        p.job.store(&rt, std::memory_order_relaxed);
        p.body = &body;
        p.ticket.store((++p.epoch << 16) | total, std::memory_order_release);
        p.ticket.notify_all();
        std::string deadlock;
        {
            std::unique_lock<std::mutex> l(rt.done_m);
            uint64_t seen = rt.progress.load();
            bool suspect = false;
            while (rt.finished < total) {
                rt.done_cv.wait_for(l, std::chrono::milliseconds(50));
                const uint64_t prog = rt.progress.load();
                std::string what;
                const bool dl = prog == seen && deadlocked(rt, &what);
                if (dl && suspect && deadlock.empty()) {
                    deadlock = what;
                    abort_launch(rt);
                }
                suspect = dl;
                seen = prog;
            }
        }
        g_rt.store(nullptr, std::memory_order_release);
        reprotect_guards();
        std::string err;
        if (!deadlock.empty()) err += deadlock + "\n";
        if (rt.trapped.load()) err += "executed __trap() (unsupported launch configuration?)\n";
        for (const Report& r : rt.reports) err += r.text + "\n";
        if (rt.dropped_reports) err += fmt("(%u more reports not shown)\n", rt.dropped_reports);
        if (!err.empty()) {
            last_error_str() = std::string("emulated kernel ") + name + ":\n" + err;
            return 1;
        }
        return 0;
    } catch (const std::exception& e) {
        g_rt.store(nullptr, std::memory_order_release);
        last_error_str() = std::string("emulated launch of ") + name + ": " + e.what();
        return 1;
    }
}

}  // namespace rotvar_emu

// ---------------------------------------------------------------- C interface

extern "C" const char* rotvar_emu_last_error() { return rotvar_emu::last_error_str().c_str(); }

// Device memory: [guard page | red zone | data (256-aligned) | red zone | guard page], poisoned
// with 0xff bytes (NaN as float), like cudaMalloc's memory never zeroed.
extern "C" void* rotvar_emu_mem_alloc(size_t bytes, size_t misalign) {
    using namespace rotvar_emu;
    misalign %= kRedZone;
    const size_t body = round_up(kRedZone + misalign + bytes + kRedZone, kPage);
    auto* m = static_cast<unsigned char*>(map_or_null(body + 2 * kPage, PROT_NONE, false));
    if (!m) return nullptr;
    if (mprotect(m + kPage, body, PROT_READ | PROT_WRITE) != 0) {
        munmap(m, body + 2 * kPage);
        return nullptr;
    }
    Alloc a;
    a.map_lo = reinterpret_cast<uintptr_t>(m);
    a.map_hi = a.map_lo + body + 2 * kPage;
    a.zone_lo = a.map_lo + kPage;
    a.zone_hi = a.map_hi - kPage;
    a.data = a.zone_lo + kRedZone + misalign;
    a.bytes = bytes;
    a.shadow_bytes = round_up((bytes + 3) / 4 * sizeof(Cell), kPage);
    a.shadow = a.shadow_bytes ? static_cast<Cell*>(map_or_null(a.shadow_bytes, PROT_READ | PROT_WRITE, true))
                              : nullptr;
    if (a.shadow_bytes && !a.shadow) {
        munmap(m, body + 2 * kPage);
        return nullptr;
    }
    memset(reinterpret_cast<void*>(a.zone_lo), 0xff, body);
    std::lock_guard<std::mutex> l(g_alloc_m);
    g_allocs[a.data] = a;
    return reinterpret_cast<void*>(a.data);
}

extern "C" void rotvar_emu_mem_free(void* p) {
    using namespace rotvar_emu;
    // A launch checks its accesses against the allocations live when it started (rt.allocs). A
    // buffer another host thread freed mid-launch would stay in that list with its shadow
    // unmapped, while a new mapping (the stack of a pool thread the launch starts, another
    // buffer) may take over its addresses: an access there would write to the unmapped shadow
    // and crash the process. So a free waits for the launch in progress.
    std::lock_guard<std::mutex> serial(launch_mutex());
    Alloc a;
    {
        std::lock_guard<std::mutex> l(g_alloc_m);
        auto it = g_allocs.find(reinterpret_cast<uintptr_t>(p));
        if (it == g_allocs.end()) return;
        a = it->second;
        g_allocs.erase(it);
    }
    if (a.shadow) munmap(a.shadow, a.shadow_bytes);
    munmap(reinterpret_cast<void*>(a.map_lo), a.map_hi - a.map_lo);
}

// ------------------------------------------------------------- __tsan hooks
// The compiler calls these before each access of the instrumented kernels.

#define RV_HOOK(n)                                                                                        \
    extern "C" void __tsan_read##n(void* p) { rotvar_emu::access(p, n, false, false); }                \
    extern "C" void __tsan_write##n(void* p) { rotvar_emu::access(p, n, true, false); }                \
    extern "C" void __tsan_unaligned_read##n(void* p) { rotvar_emu::access(p, n, false, false); }      \
    extern "C" void __tsan_unaligned_write##n(void* p) { rotvar_emu::access(p, n, true, false); }      \
    extern "C" void __tsan_volatile_read##n(void* p) { rotvar_emu::access(p, n, false, false); }       \
    extern "C" void __tsan_volatile_write##n(void* p) { rotvar_emu::access(p, n, true, false); }       \
    extern "C" void __tsan_unaligned_volatile_read##n(void* p) { rotvar_emu::access(p, n, false, false); } \
    extern "C" void __tsan_unaligned_volatile_write##n(void* p) { rotvar_emu::access(p, n, true, false); }
RV_HOOK(1)
RV_HOOK(2)
RV_HOOK(4)
RV_HOOK(8)
RV_HOOK(16)
#undef RV_HOOK
extern "C" void __tsan_read_range(void* p, unsigned long n) {
    if (n) rotvar_emu::access(p, n, false, false);
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
    if (n) rotvar_emu::access(p, n, true, false);
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_read(void**) {}
extern "C" void __tsan_vptr_update(void**, void*) {}

// Atomics: performed (sequentially consistent, whatever order was asked: stronger is
// correct), bounds-checked, and exempt from racecheck.
#define RV_ATOMIC(n, T)                                                                                          \
    extern "C" T __tsan_atomic##n##_load(const volatile T* a, int) {                                            \
        rotvar_emu::access((const void*)a, sizeof(T), false, true);                                             \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                            \
    }                                                                                                            \
    extern "C" void __tsan_atomic##n##_store(volatile T* a, T v, int) {                                         \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                               \
    }                                                                                                            \
    extern "C" T __tsan_atomic##n##_exchange(volatile T* a, T v, int) {                                         \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                     \
    }                                                                                                            \
    extern "C" T __tsan_atomic##n##_fetch_add(volatile T* a, T v, int) {                                        \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                      \
    }                                                                                                            \
    extern "C" T __tsan_atomic##n##_fetch_sub(volatile T* a, T v, int) {                                        \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                      \
    }                                                                                                            \
    extern "C" T __tsan_atomic##n##_fetch_and(volatile T* a, T v, int) {                                        \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                      \
    }                                                                                                            \
    extern "C" T __tsan_atomic##n##_fetch_or(volatile T* a, T v, int) {                                         \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                       \
    }                                                                                                            \
    extern "C" T __tsan_atomic##n##_fetch_xor(volatile T* a, T v, int) {                                        \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                      \
    }                                                                                                            \
    extern "C" T __tsan_atomic##n##_fetch_nand(volatile T* a, T v, int) {                                       \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                     \
    }                                                                                                            \
    extern "C" int __tsan_atomic##n##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {             \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                 \
    }                                                                                                            \
    extern "C" int __tsan_atomic##n##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {               \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
    }                                                                                                            \
    extern "C" T __tsan_atomic##n##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                   \
        rotvar_emu::access((const void*)a, sizeof(T), true, true);                                              \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                       \
        return c;                                                                                                \
    }
RV_ATOMIC(8, char)
RV_ATOMIC(16, short)
RV_ATOMIC(32, int)
RV_ATOMIC(64, long long)
#undef RV_ATOMIC
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
