// recipec's CUDA emulator: the generated CUDA C, compiled by the host's C++ compiler and run on
// the CPU, for testing the CUDA code generator where no GPU exists. See runtime/src/cuda_emu.rs.
//
// Each block runs alone; its threads are cooperative contexts (ucontext) on one OS thread,
// switched only at barriers: `__syncthreads()` waits for every live thread of the block,
// `__shfl_down_sync` for every live lane of the warp (threads 32w..32w+31 of the block, in
// linear order x, then y, then z). A thread that returns leaves every barrier (as on
// Volta and later). Errors a GPU would hang on or leave undefined are reported instead:
// threads of a block waiting at different barriers, a shuffle from a lane that has exited,
// a `__syncthreads()` in a kernel launched as barrier-free.
// Arithmetic: x86-64 SSE, compiled with -ffp-contract=off (NVRTC's --fmad=false): f32 and
// f64 operations round as the GPU's do; libm functions are glibc's, not CUDA's.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

// The unit's tensor-core helper (`rc_mma16816`) takes its portable form here.
#define RC_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time, so one static copy is the block's shared memory.
#define __shared__ static

struct rc_dim3 {
    unsigned x, y, z;
};
static rc_dim3 threadIdx, blockIdx, blockDim, gridDim;

// CUDA's 128-bit vector of four floats (the emulator does not need its 16-byte alignment).
struct float4 { float x, y, z, w; };
static inline float4 make_float4(float x, float y, float z, float w) { float4 v = {x, y, z, w}; return v; }
static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
static inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
static inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
static inline double __longlong_as_double(long long x) { double f; memcpy(&f, &x, 8); return f; }
static inline long long __double_as_longlong(double f) { long long x; memcpy(&x, &f, 8); return x; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return sqrt(a); }

// ---- the scheduler ----
enum { RC_RUN = 0, RC_BLOCK = 1, RC_WARP = 2, RC_DONE = 3 };
struct rc_thread {
    ucontext_t ctx;
    int state;
};
static const size_t RC_STACK = 64 * 1024;
static const int RC_MAX_THREADS = 1024;
static rc_thread rc_threads[RC_MAX_THREADS];
static char* rc_stacks = 0;  // one stack per thread of a block, for one launch
static ucontext_t rc_main;
static int rc_cur = -1, rc_count = 0, rc_direct = 0;
static unsigned char rc_slots[RC_MAX_THREADS][8];
static char rc_error[512];
typedef void (*rc_kernel)(unsigned char* const*);
static rc_kernel rc_fn;
static unsigned char* const* rc_bufs;

static void rc_fail(const char* msg) {
    if (!rc_error[0]) snprintf(rc_error, sizeof rc_error, "%s (block (%u, %u, %u), thread %d)", msg, blockIdx.x, blockIdx.y, blockIdx.z, rc_cur);
}

static void rc_set_thread(int t) {
    rc_cur = t;
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}

static void rc_yield(int state) {
    if (rc_direct) {
        rc_fail("a barrier in a kernel launched without barriers");
        return;
    }
    rc_threads[rc_cur].state = state;
    swapcontext(&rc_threads[rc_cur].ctx, &rc_main);
}

static void __syncthreads() { rc_yield(RC_BLOCK); }

template <class T>
static T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    (void)mask;
    int me = rc_cur;
    memcpy(rc_slots[me], &v, sizeof(T));
    rc_yield(RC_WARP);
    T r = v;
    int lane = me & 31;
    if (lane + (int)delta < width) {
        int src = me + (int)delta;
        if (src >= rc_count || rc_threads[src].state == RC_DONE) {
            rc_fail("__shfl_down_sync reads a lane that has exited");
        } else {
            memcpy(&r, rc_slots[src], sizeof(T));
        }
    }
    rc_yield(RC_WARP);  // every lane has read before the slots are written again
    return r;
}

// `__shfl_sync` with a source lane (width 32): every live lane of the warp takes part.
template <class T>
static T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    (void)mask;
    (void)width;
    int me = rc_cur;
    memcpy(rc_slots[me], &v, sizeof(T));
    rc_yield(RC_WARP);
    T r = v;
    int src = (me & ~31) + (src_lane & 31);
    if (src >= rc_count || rc_threads[src].state == RC_DONE) {
        rc_fail("__shfl_sync reads a lane that has exited");
    } else {
        memcpy(&r, rc_slots[src], sizeof(T));
    }
    rc_yield(RC_WARP);
    return r;
}

static void rc_entry() {
    rc_fn(rc_bufs);
    rc_threads[rc_cur].state = RC_DONE;
}

// Runs one block; returns 0, or -1 with `rc_error` set.
static int rc_block(int n) {
    for (int t = 0; t < n; t++) {
        rc_thread& th = rc_threads[t];
        getcontext(&th.ctx);
        th.ctx.uc_stack.ss_sp = rc_stacks + (size_t)t * RC_STACK;
        th.ctx.uc_stack.ss_size = RC_STACK;
        th.ctx.uc_link = &rc_main;
        makecontext(&th.ctx, rc_entry, 0);
        th.state = RC_RUN;
    }
    for (;;) {
        for (int t = 0; t < n; t++) {
            if (rc_threads[t].state != RC_RUN) continue;
            rc_set_thread(t);
            swapcontext(&rc_main, &rc_threads[t].ctx);
            if (rc_error[0]) return -1;
        }
        int live = 0, at_block = 0;
        for (int t = 0; t < n; t++) {
            int s = rc_threads[t].state;
            live += s != RC_DONE;
            at_block += s == RC_BLOCK;
        }
        if (live == 0) return 0;
        int released = 0;
        for (int w = 0; w < n; w += 32) {
            int wl = 0, ww = 0;
            for (int t = w; t < w + 32 && t < n; t++) {
                wl += rc_threads[t].state != RC_DONE;
                ww += rc_threads[t].state == RC_WARP;
            }
            if (ww > 0 && ww == wl) {
                for (int t = w; t < w + 32 && t < n; t++)
                    if (rc_threads[t].state == RC_WARP) rc_threads[t].state = RC_RUN;
                released = 1;
            }
        }
        if (!released && at_block == live) {
            for (int t = 0; t < n; t++)
                if (rc_threads[t].state == RC_BLOCK) rc_threads[t].state = RC_RUN;
            released = 1;
        }
        if (!released) {
            rc_cur = -1;
            rc_fail("deadlock: the threads of a block wait at different barriers");
            return -1;
        }
    }
}

// Launches `kernel` over the grid, block after block. `barriers` = 0: the kernel has no
// barrier and its threads run one after another directly. Returns 0, or -1 with the error
// copied into `err`.
// `reverse`: blocks in the reverse of the usual order (and, without barriers, a block's
// threads too). A correct kernel gives the same bits in either order, since on a GPU blocks
// (and threads between barriers) run in no fixed order; a difference is a race.
extern "C" int rc_emu_launch(rc_kernel kernel, const unsigned* grid, const unsigned* block, unsigned char* const* bufs,
                             int barriers, int reverse, char* err, size_t errlen) {
    rc_error[0] = 0;
    int n = (int)(block[0] * block[1] * block[2]);
    if (n <= 0 || n > RC_MAX_THREADS) {
        snprintf(err, errlen, "block of %d threads (1 to %d)", n, RC_MAX_THREADS);
        return -1;
    }
    if (barriers) {
        rc_stacks = (char*)malloc(RC_STACK * (size_t)n);
        if (!rc_stacks) {
            snprintf(err, errlen, "cannot allocate the emulated threads' stacks");
            return -1;
        }
    }
    rc_fn = kernel;
    rc_bufs = bufs;
    rc_count = n;
    rc_direct = !barriers;
    gridDim.x = grid[0]; gridDim.y = grid[1]; gridDim.z = grid[2];
    blockDim.x = block[0]; blockDim.y = block[1]; blockDim.z = block[2];
    const unsigned long long blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    for (unsigned long long i = 0; i < blocks; i++) {
        const unsigned long long b = reverse ? blocks - 1 - i : i;
        blockIdx.x = (unsigned)(b % grid[0]);
        blockIdx.y = (unsigned)((b / grid[0]) % grid[1]);
        blockIdx.z = (unsigned)(b / ((unsigned long long)grid[0] * grid[1]));
        int rc = 0;
        if (barriers) {
            rc = rc_block(n);
        } else {
            for (int i = 0; i < n && !rc_error[0]; i++) {
                rc_set_thread(reverse ? n - 1 - i : i);
                kernel(bufs);
            }
            rc = rc_error[0] ? -1 : 0;
        }
        if (rc != 0) {
            snprintf(err, errlen, "%s", rc_error);
            free(rc_stacks);
            rc_stacks = 0;
            return -1;
        }
    }
    free(rc_stacks);
    rc_stacks = 0;
    return 0;
}
