// A small emulation of the CUDA execution model in C++20, so that kernels/*.cu compile with
// g++ and run on the CPU for tests (tests/kernels_emulated.rs). It is not a GPU simulator:
// it has no warps (the kernels use no warp shuffles or warp-synchronous code), no memory
// spaces beyond ordinary memory, and no timing.
//
// Model: a launch runs its blocks one after another. Within a block, each CUDA thread is
// either a fiber (the default: fast and deterministic) or, with MEDCNN_EMU_OS_THREADS, an OS
// thread with a real barrier (for -fsanitize=thread, which then reports any shared-memory
// access that no __syncthreads orders). __shared__ variables are function statics: one copy,
// used by the one block that is running. Built-ins (threadIdx, blockIdx, blockDim, gridDim)
// are thread-local or launch-wide variables.

#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if !defined(MEDCNN_EMU_OS_THREADS) && !defined(__x86_64__)
#include <ucontext.h>
#endif

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) float2 {
    float x, y;
};

struct alignas(16) float4 {
    float x, y, z, w;
};

namespace emu {
inline thread_local uint3 thread_idx{0, 0, 0};
inline thread_local uint3 block_idx{0, 0, 0};
inline dim3 block_dim;
inline dim3 grid_dim;

// Linear thread index t -> threadIdx.
inline uint3 thread_index(unsigned int t, dim3 block) {
    return {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
}

#ifdef MEDCNN_EMU_OS_THREADS
// One OS thread per CUDA thread: true parallelism, so -fsanitize=thread sees every access
// to shared memory that no __syncthreads orders, i.e. every missing barrier.
inline std::barrier<>* block_barrier = nullptr;

inline void syncthreads() { block_barrier->arrive_and_wait(); }

// Runs `body` (a call of the kernel with its arguments) on every thread of every block.
template <class F>
void launch(dim3 grid, dim3 block, F&& body) {
    const unsigned int threads = block.x * block.y * block.z;
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    grid_dim = grid;
    block_dim = block;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            thread_idx = thread_index(t, block);
            for (unsigned int z = 0; z < grid.z; ++z)
                for (unsigned int y = 0; y < grid.y; ++y)
                    for (unsigned int x = 0; x < grid.x; ++x) {
                        block_idx = {x, y, z};
                        body();
                        // The next block reuses the __shared__ statics: wait for everyone.
                        barrier.arrive_and_wait();
                    }
        });
    }
    for (auto& th : pool) th.join();
    block_barrier = nullptr;
}
#else
// One fiber per CUDA thread, all on the calling OS thread: each runs until its next
// __syncthreads, then the next one runs; a barrier is passed when every fiber has reached it.
// Much faster than OS threads, deterministic, and strict: a block whose threads do not all
// reach the same barriers (some exited, some waiting) is reported as an error. The context
// switch is a few instructions of assembly on x86-64 (ucontext elsewhere, which makes a
// system call per switch).
struct Fiber {
    bool done;
#if defined(__x86_64__)
    void* sp;
#else
    ucontext_t ctx;
#endif
};
inline Fiber* running = nullptr;
inline std::function<void()>* fiber_body = nullptr;
inline constexpr size_t kFiberStack = 256 * 1024;

#if defined(__x86_64__)
// switch_stack(&save, to): pushes the callee-saved registers, stores the stack pointer in
// *save, loads `to` and pops the registers saved there.
extern "C" void medcnn_emu_switch_stack(void** save, void* to);
asm(R"(
    .text
    .globl medcnn_emu_switch_stack
    .type medcnn_emu_switch_stack, @function
medcnn_emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size medcnn_emu_switch_stack, .-medcnn_emu_switch_stack
)");
inline void* scheduler_sp = nullptr;

[[noreturn]] inline void fiber_entry() {
    (*fiber_body)();
    running->done = true;
    void* dead;
    medcnn_emu_switch_stack(&dead, scheduler_sp);
    __builtin_unreachable();
}

inline void start_fiber(Fiber& f, char* stack) {
    auto* sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + kFiberStack) & ~uintptr_t(15));
    *--sp = nullptr;                                    // fiber_entry's (unused) return address
    *--sp = reinterpret_cast<void*>(&fiber_entry);      // where the first switch "returns"
    for (int i = 0; i < 6; ++i) *--sp = nullptr;        // rbp rbx r12 r13 r14 r15
    f.sp = sp;
    f.done = false;
}
inline void resume(Fiber& f) { medcnn_emu_switch_stack(&scheduler_sp, f.sp); }
inline void syncthreads() { medcnn_emu_switch_stack(&running->sp, scheduler_sp); }
#else
inline ucontext_t scheduler;
inline void fiber_main() {
    (*fiber_body)();
    running->done = true;  // uc_link returns to the scheduler
}
inline void start_fiber(Fiber& f, char* stack) {
    f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack;
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = &scheduler;
    makecontext(&f.ctx, fiber_main, 0);
}
inline void resume(Fiber& f) { swapcontext(&scheduler, &f.ctx); }
inline void syncthreads() { swapcontext(&running->ctx, &scheduler); }
#endif

template <class F>
void launch(dim3 grid, dim3 block, F&& body) {
    const unsigned int threads = block.x * block.y * block.z;
    static std::vector<std::unique_ptr<char[]>> stacks;
    while (stacks.size() < threads) stacks.emplace_back(new char[kFiberStack]);
    std::vector<Fiber> fibers(threads);
    std::function<void()> fn = [&] { body(); };
    fiber_body = &fn;
    grid_dim = grid;
    block_dim = block;
    for (unsigned int z = 0; z < grid.z; ++z)
        for (unsigned int y = 0; y < grid.y; ++y)
            for (unsigned int x = 0; x < grid.x; ++x) {
                block_idx = {x, y, z};
                for (unsigned int t = 0; t < threads; ++t) start_fiber(fibers[t], stacks[t].get());
                for (;;) {
                    unsigned int waiting = 0, finished = 0;
                    for (unsigned int t = 0; t < threads; ++t) {
                        Fiber& f = fibers[t];
                        if (f.done) {
                            ++finished;
                            continue;
                        }
                        running = &f;
                        thread_idx = thread_index(t, block);
                        resume(f);
                        if (f.done) ++finished;
                        else ++waiting;
                    }
                    if (waiting == 0) break;
                    if (finished > 0)
                        throw std::runtime_error("__syncthreads reached by " + std::to_string(waiting) + " threads of " +
                                                 std::to_string(threads) + " (the others exited): divergent barrier");
                }
            }
    running = nullptr;
    fiber_body = nullptr;
}
#endif
}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

inline void __syncthreads() { ::emu::syncthreads(); }

// Math: the CUDA names of what <cmath> already has, and the intrinsics. The *_rn forms round
// each operation to nearest, which is what plain float arithmetic does on the host (x86-64
// SSE, no fused multiply-add unless asked for).
using std::max;
using std::min;
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}
