/* Training kernels for the seed model's two convolution blocks, conv -> 2x2 max-pool -> ReLU.

   Built at first use by mnist_cnn/kernels.py (cc -O3 -march=native) and called through ctypes;
   every tensor is float32 and laid out as the comments say, every size a compile-time constant
   of one of the wrappers at the end, so the compiler unrolls and vectorises the inner loops.

   conv1_fused_fwd, conv2_fused_fwd: out = relu(maxpool(conv(x))) and idx (below) from the
     block's input, weight and bias, the convolution computed here, its full-size map never
     written.
   pool_relu_fwd: the convolution's output y (B, H, W, C) channels-last -> out = relu(maxpool(y))
     (any strides) and idx (B, H/2, W/2, C) uint8: the window position of the maximum,
     0 1 / 2 3 in row-major order, the first of equal values as torch's max_pool2d takes it,
     or 4 where the ReLU is closed (max <= 0) and no gradient flows.
   conv_pool_bwd: from the gradient g of `out` and idx, the gradients of the convolution's
     weight (Co, K, K, Ci), bias (Co) and, when dx is not NULL, of its input x (B, Hi, Wi, Ci).
     Only one position in four of the convolution's output has a gradient, so this does a
     quarter of the work of a dense convolution backward.

   Threads split the batch. The weight gradients are summed per fixed chunk of the batch
   (GRAD_CHUNKS of them, whatever the thread count) and the chunks' sums added in order, so a
   result depends only on the inputs: the same at any thread count. */

#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_THREADS 64
#define GRAD_CHUNKS 16 /* weight-gradient partial sums per batch (fewer for smaller batches) */

typedef void (*chunk_fn)(void *arg, int thread, int64_t begin, int64_t end);

struct chunk {
    chunk_fn fn;
    void *arg;
    int thread;
    int64_t begin, end;
};

static void *run_chunk(void *p) {
    struct chunk *c = (struct chunk *)p;
    c->fn(c->arg, c->thread, c->begin, c->end);
    return NULL;
}

/* [0, n) in `threads` contiguous chunks, chunk 0 on the caller, the others on threads started
   for this call and joined before it returns: no state survives the call. The fallback of
   parallel() below (another thread is using the pool, or no worker could be started). */
static int parallel_spawn(struct chunk *chunks, int threads) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&ids[t], NULL, run_chunk, &chunks[t]) == 0;
        if (!started[t]) run_chunk(&chunks[t]);
    }
    run_chunk(&chunks[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
    }
    return threads;
}

/* The pool: workers started once and kept, each spinning for POOL_SPIN_NS after its last job
   (the next kernel call of a training step usually comes within that: waking costs ~1 us
   instead of the ~80 us of starting and joining a thread, measured on a 2-vCPU KVM guest),
   then sleeping on a condition variable. One caller at a time uses it (`use`); a concurrent
   caller starts its own threads instead. A fork()ed child has no workers: it starts afresh.
   Generations: the caller publishes the jobs, then bumps `generation`; every worker runs its
   job of that generation (or none) and decrements `pending`, which the caller waits to reach
   0. A worker starts knowing the generation at its creation, so it cannot miss the first job
   published after it. */
#define POOL_SPIN_NS 200000L

static struct {
    pthread_mutex_t use, lock;
    pthread_cond_t wake;
    int workers;
    unsigned generation; /* written under `lock`, read atomically by spinning workers */
    struct chunk jobs[MAX_THREADS];
    int pending;         /* atomic */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, {{0}}, 0};

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void pool_after_fork(void) {
    pthread_mutex_init(&pool.use, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = 0;
    __atomic_store_n(&pool.pending, 0, __ATOMIC_RELAXED);
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000L + t.tv_nsec;
}

struct worker_start {
    int index;
    unsigned seen;
};

static void *pool_worker(void *p) {
    const int index = ((struct worker_start *)p)->index;
    unsigned seen = ((struct worker_start *)p)->seen;
    free(p);
    for (;;) {
        unsigned generation = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE);
        if (generation == seen) {
            const int64_t until = now_ns() + POOL_SPIN_NS;
            while ((generation = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE)) == seen && now_ns() < until)
                __builtin_ia32_pause();
        }
        if (generation == seen) {
            pthread_mutex_lock(&pool.lock);
            while ((generation = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE)) == seen)
                pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = generation;
        struct chunk job = pool.jobs[index];
        if (job.fn) run_chunk(&job);
        __atomic_sub_fetch(&pool.pending, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* Returns the number of chunks. */
static int parallel(chunk_fn fn, void *arg, int64_t n, int threads) {
    struct chunk chunks[MAX_THREADS];
    if (threads > n) threads = (int)n;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    for (int t = 0; t < threads; t++) {
        chunks[t] = (struct chunk){fn, arg, t, n * t / threads, n * (t + 1) / threads};
    }
    if (threads == 1) {
        run_chunk(&chunks[0]);
        return 1;
    }
    pthread_once(&pool_once, pool_init);
    if (pthread_mutex_trylock(&pool.use) != 0) return parallel_spawn(chunks, threads);
    while (pool.workers < threads - 1) {
        struct worker_start *start = malloc(sizeof *start);
        pthread_attr_t attr;
        pthread_t id;
        int ok = 0;
        if (start && pthread_attr_init(&attr) == 0) {
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            pthread_mutex_lock(&pool.lock);
            *start = (struct worker_start){pool.workers, pool.generation};
            pthread_mutex_unlock(&pool.lock);
            ok = pthread_create(&id, &attr, pool_worker, start) == 0;
            pthread_attr_destroy(&attr);
        }
        if (!ok) {
            free(start);
            break;
        }
        pool.workers++;
    }
    if (pool.workers < threads - 1) {
        pthread_mutex_unlock(&pool.use);
        return parallel_spawn(chunks, threads);
    }
    for (int w = 0; w < pool.workers; w++) {
        pool.jobs[w] = w + 1 < threads ? chunks[w + 1] : (struct chunk){0};
    }
    __atomic_store_n(&pool.pending, pool.workers, __ATOMIC_RELAXED);
    pthread_mutex_lock(&pool.lock);
    __atomic_store_n(&pool.generation, pool.generation + 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_chunk(&chunks[0]);
    for (long spins = 0; __atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0; spins++) {
        if (spins < 100000) __builtin_ia32_pause();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.use);
    return threads;
}

/* ------------------------------------------------------------------ forward: pool + ReLU */

struct pool_args {
    const float *y;
    float *out;
    uint8_t *idx;
    int64_t osb, osh, osw, osc; /* strides of out, in elements, in (b, h, w, c) order */
};

static inline __attribute__((always_inline)) void pool_relu_chunk(
    const struct pool_args *a, int64_t begin, int64_t end, const int H, const int W, const int C) {
    const int Hp = H / 2, Wp = W / 2;
    for (int64_t b = begin; b < end; b++) {
        for (int py = 0; py < Hp; py++) {
            const float *restrict r0 = a->y + ((b * H + 2 * py) * W) * C;
            const float *restrict r1 = r0 + W * C;
            float *restrict out = a->out + b * a->osb + py * a->osh;
            uint8_t *restrict idx = a->idx + ((b * Hp + py) * Wp) * C;
            for (int px = 0; px < Wp; px++) {
                for (int c = 0; c < C; c++) {
                    /* the first maximum in row-major order: row 0's pair, row 1's pair, then
                       row 1 only if strictly greater */
                    float m0 = r0[2 * px * C + c], v1 = r0[(2 * px + 1) * C + c];
                    int k0 = 0;
                    if (v1 > m0) { m0 = v1; k0 = 1; }
                    float m1 = r1[2 * px * C + c], v3 = r1[(2 * px + 1) * C + c];
                    int k1 = 2;
                    if (v3 > m1) { m1 = v3; k1 = 3; }
                    if (m1 > m0) { m0 = m1; k0 = k1; }
                    const int open = m0 > 0.0f;
                    out[px * a->osw + c * a->osc] = open ? m0 : 0.0f;
                    idx[px * C + c] = (uint8_t)(open ? k0 : 4);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ forward: conv1 fused */

typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16a __attribute__((vector_size(64)));

static inline v16a select16(v16i mask, v16a a, v16a b) {
    return (v16a)((mask & (v16i)a) | (~mask & (v16i)b));
}

/* conv1 (1 -> 6 channels, 5x5) + 2x2 max-pool + ReLU for one image, never materialising the
   24x24 map. Lanes hold a pooled row in the output's own order, j = i*6 + c (i the pooled
   column, c the channel; 72 lanes in 5 vectors, the last half used): four accumulator sets
   give the window's four convolution outputs (top/bottom row x even/odd column), so pooling
   is lane-wise. Input pixels reach the lanes through two expanded copies of each input row,
   ex[r][p][i*6 + c] = img[r][2i + p] for p = 0, 1; column 2i + kw (+1) is then a plain load
   at lane offset (kw / 2) * 6. Summation order is fixed per lane (bias, then kh, kw), so equal
   input patches give equal values and ties break as torch's max_pool2d breaks them. */
struct conv1_args {
    const float *x;      /* (B, 28, 28) */
    const float *w;      /* (6, 5, 5) */
    const float *bias;   /* (6) */
    float *out;          /* (B, 12, 12, 6) */
    uint8_t *idx;        /* (B, 12, 12, 6) */
};

static void conv1_fused_chunk(void *arg, int thread, int64_t begin, int64_t end) {
    (void)thread;
    const struct conv1_args *a = (const struct conv1_args *)arg;
    enum { N = 28, K = 5, C = 6, P = 12, V = 5, EX = 96 };
    v16a wv[K][K][3], bv[3];
    float lanes[48];
    for (int kh = 0; kh < K; kh++)
        for (int kw = 0; kw < K; kw++)
            for (int m = 0; m < 3; m++) {
                for (int l = 0; l < 16; l++) lanes[l] = a->w[((16 * m + l) % C) * K * K + kh * K + kw];
                memcpy(&wv[kh][kw][m], lanes, 64);
            }
    for (int m = 0; m < 3; m++) {
        for (int l = 0; l < 16; l++) lanes[l] = a->bias[(16 * m + l) % C];
        memcpy(&bv[m], lanes, 64);
    }
    /* gather pattern of the expansion: chunk q, lane l -> pixel 2 * ((16q + l) / 6) (+1) */
    v16i perm[EX / 16][2];
    int base[EX / 16];
    v16i live[EX / 16];
    for (int q = 0; q < EX / 16; q++) {
        base[q] = 2 * ((16 * q) / C);
        for (int l = 0; l < 16; l++) {
            const int i = (16 * q + l) / C;
            perm[q][0][l] = 2 * i - base[q];
            perm[q][1][l] = 2 * i + 1 - base[q];
            live[q][l] = i < 14 ? -1 : 0;
        }
    }
    float img[N * N + 32] __attribute__((aligned(64)));
    float ex[N][2][EX] __attribute__((aligned(64)));
    memset(img + N * N, 0, 32 * sizeof(float));
    for (int64_t b = begin; b < end; b++) {
        memcpy(img, a->x + b * N * N, N * N * sizeof(float));
        for (int r = 0; r < N; r++) {
            for (int q = 0; q < EX / 16; q++) {
                v16a src;
                memcpy(&src, img + r * N + base[q], 64);
                for (int p = 0; p < 2; p++) {
                    v16a e = __builtin_shuffle(src, perm[q][p]);
                    e = (v16a)((v16i)e & live[q]);
                    memcpy(&ex[r][p][16 * q], &e, 64);
                }
            }
        }
        float *out = a->out + b * P * P * C;
        uint8_t *idx = a->idx + b * P * P * C;
        for (int py = 0; py < P; py++) {
            v16a acc[4][V]; /* 0: top even, 1: top odd, 2: bottom even, 3: bottom odd */
            for (int s = 0; s < 4; s++)
                for (int m = 0; m < V; m++) acc[s][m] = bv[m % 3];
            for (int kh = 0; kh < K; kh++) {
                for (int kw = 0; kw < K; kw++) {
                    const float *e0 = &ex[2 * py + kh][kw & 1][(kw >> 1) * C];
                    const float *o0 = &ex[2 * py + kh][(kw + 1) & 1][((kw + 1) >> 1) * C];
                    const float *e1 = &ex[2 * py + 1 + kh][kw & 1][(kw >> 1) * C];
                    const float *o1 = &ex[2 * py + 1 + kh][(kw + 1) & 1][((kw + 1) >> 1) * C];
                    for (int m = 0; m < V; m++) {
                        v16a t;
                        const v16a w = wv[kh][kw][m % 3];
                        memcpy(&t, e0 + 16 * m, 64); acc[0][m] += t * w;
                        memcpy(&t, o0 + 16 * m, 64); acc[1][m] += t * w;
                        memcpy(&t, e1 + 16 * m, 64); acc[2][m] += t * w;
                        memcpy(&t, o1 + 16 * m, 64); acc[3][m] += t * w;
                    }
                }
            }
            float pooled[V * 16];
            int32_t which[V * 16];
            const v16a zero = {0};
            for (int m = 0; m < V; m++) {
                /* first maximum in row-major order, as pool_relu_chunk */
                v16i g1 = acc[1][m] > acc[0][m];
                v16a m0 = select16(g1, acc[1][m], acc[0][m]);
                v16i k0 = g1 & 1;
                v16i g3 = acc[3][m] > acc[2][m];
                v16a m1 = select16(g3, acc[3][m], acc[2][m]);
                v16i k1 = 2 + (g3 & 1);
                v16i g = m1 > m0;
                v16a mx = select16(g, m1, m0);
                v16i k = (g & k1) | (~g & k0);
                v16i open = mx > zero;
                mx = select16(open, mx, zero);
                k = (open & k) | (~open & 4);
                memcpy(pooled + 16 * m, &mx, 64);
                memcpy(which + 16 * m, &k, 64);
            }
            memcpy(out + py * P * C, pooled, P * C * sizeof(float));
            for (int j = 0; j < P * C; j++) idx[py * P * C + j] = (uint8_t)which[j];
        }
    }
}

void conv1_fused_fwd(const float *x, const float *w, const float *bias, float *out, uint8_t *idx,
                     int64_t batch, int threads) {
    struct conv1_args a = {x, w, bias, out, idx};
    parallel(conv1_fused_chunk, &a, batch, threads);
}

/* conv2 (6 -> 16 channels, 5x5) + 2x2 max-pool + ReLU, never materialising the 8x8 map. The 16
   output channels are the 16 lanes of one vector; the four accumulators are one pooling
   window's four positions, each weight vector loaded once for the four. */
struct conv2_args {
    const float *x;      /* (B, 12, 12, 6) */
    const float *w;      /* (16, 5, 5, 6) */
    const float *bias;   /* (16) */
    float *out;          /* (B, 16, 4, 4) with strides osb, osh, osw, osc */
    uint8_t *idx;        /* (B, 4, 4, 16) */
    int64_t osb, osh, osw, osc;
};

static void conv2_fused_chunk(void *arg, int thread, int64_t begin, int64_t end) {
    (void)thread;
    const struct conv2_args *a = (const struct conv2_args *)arg;
    enum { N = 12, K = 5, C = 6, O = 16, P = 4 };
    v16a wt[K][K][C], bv;
    float lanes[O];
    for (int kh = 0; kh < K; kh++)
        for (int kw = 0; kw < K; kw++)
            for (int c = 0; c < C; c++) {
                for (int o = 0; o < O; o++) lanes[o] = a->w[((o * K + kh) * K + kw) * C + c];
                memcpy(&wt[kh][kw][c], lanes, 64);
            }
    memcpy(&bv, a->bias, 64);
    const v16a zero = {0};
    for (int64_t b = begin; b < end; b++) {
        const float *img = a->x + b * N * N * C;
        for (int py = 0; py < P; py++) {
            /* two pooled pixels (px, px + 1) at once: 8 accumulators, each weight vector
               loaded once for the 8 FMAs */
            for (int px = 0; px < P; px += 2) {
                v16a acc[2][4]; /* [pixel][window position 0 1 / 2 3] */
                for (int q = 0; q < 2; q++)
                    for (int s = 0; s < 4; s++) acc[q][s] = bv;
                for (int kh = 0; kh < K; kh++) {
                    const float *r0 = img + ((2 * py + kh) * N + 2 * px) * C;
                    const float *r1 = r0 + N * C;
                    for (int kw = 0; kw < K; kw++) {
                        for (int c = 0; c < C; c++) {
                            const v16a w = wt[kh][kw][c];
                            for (int q = 0; q < 2; q++) {
                                acc[q][0] += r0[(2 * q + kw) * C + c] * w;
                                acc[q][1] += r0[(2 * q + kw + 1) * C + c] * w;
                                acc[q][2] += r1[(2 * q + kw) * C + c] * w;
                                acc[q][3] += r1[(2 * q + kw + 1) * C + c] * w;
                            }
                        }
                    }
                }
                for (int q = 0; q < 2; q++) {
                    v16i g1 = acc[q][1] > acc[q][0];
                    v16a m0 = select16(g1, acc[q][1], acc[q][0]);
                    v16i k0 = g1 & 1;
                    v16i g3 = acc[q][3] > acc[q][2];
                    v16a m1 = select16(g3, acc[q][3], acc[q][2]);
                    v16i k1 = 2 + (g3 & 1);
                    v16i g = m1 > m0;
                    v16a mx = select16(g, m1, m0);
                    v16i k = (g & k1) | (~g & k0);
                    v16i open = mx > zero;
                    mx = select16(open, mx, zero);
                    k = (open & k) | (~open & 4);
                    float *out = a->out + b * a->osb + py * a->osh + (px + q) * a->osw;
                    uint8_t *idx = a->idx + ((b * P + py) * P + px + q) * O;
                    for (int o = 0; o < O; o++) {
                        out[o * a->osc] = mx[o];
                        idx[o] = (uint8_t)k[o];
                    }
                }
            }
        }
    }
}

void conv2_fused_fwd(const float *x, const float *w, const float *bias, float *out, uint8_t *idx,
                     int64_t batch, int64_t osb, int64_t osh, int64_t osw, int64_t osc, int threads) {
    struct conv2_args a = {x, w, bias, out, idx, osb, osh, osw, osc};
    parallel(conv2_fused_chunk, &a, batch, threads);
}

/* ------------------------------------------------------------------ backward */

/* Unaligned vectors: GCC's vector extension, lowered to AVX-512, AVX2 or SSE by -march. */
typedef float v8 __attribute__((vector_size(32), aligned(4), __may_alias__));
typedef float v16 __attribute__((vector_size(64), aligned(4), __may_alias__));

struct bwd_args {
    const float *g;
    int64_t gsb, gsh, gsw, gsc; /* strides of g, in elements, in (b, h, w, c) order */
    const uint8_t *idx;
    const float *x;
    const float *w;
    float *dx;      /* NULL: no input gradient */
    float *partial; /* threads x (Co*K*K*Ci + Co) */
    int64_t batch;
};

/* The weight gradient of output channel o keeps its K rows of K*Ci values in registers: NV
   vectors of V lanes per row, V*NV >= K*Ci. A row is loaded whole, V*NV floats from where the
   patch row starts, so it reads a few floats past the patch (into the next pixels, lanes that
   are dropped); only the batch's last image, where that could run past the tensor, goes the
   scalar way. */
#define DEFINE_WEIGHT_GRAD(NAME, VT, V, NV)                                                    \
    static inline __attribute__((always_inline)) void NAME(                                    \
        const struct bwd_args *a, float *restrict dw, float *restrict db, int64_t begin,       \
        int64_t end, const int Hi, const int Wi, const int Ci, const int Co, const int K) {    \
        const int Hp = (Hi - K + 1) / 2, Wp = (Wi - K + 1) / 2, L = K * Ci;                    \
        for (int o = 0; o < Co; o++) {                                                         \
            VT acc[K][NV];                                                                     \
            float tail[K * L];                                                                 \
            float dbo = 0.0f;                                                                  \
            for (int kh = 0; kh < K; kh++)                                                     \
                for (int v = 0; v < NV; v++) acc[kh][v] = (VT){0};                             \
            for (int j = 0; j < K * L; j++) tail[j] = 0.0f;                                    \
            for (int64_t b = begin; b < end; b++) {                                            \
                const int last = b == a->batch - 1;                                            \
                const uint8_t *ib = a->idx + b * Hp * Wp * Co + o;                             \
                const float *gb = a->g + b * a->gsb + o * a->gsc;                              \
                for (int py = 0; py < Hp; py++) {                                              \
                    for (int px = 0; px < Wp; px++) {                                          \
                        /* branch-free: a closed ReLU (k == 4) adds zeros at position 0 */     \
                        const int k = ib[(py * Wp + px) * Co] & 7;                             \
                        const float gv = k == 4 ? 0.0f : gb[py * a->gsh + px * a->gsw];        \
                        const int y = 2 * py + ((k >> 1) & 1), x = 2 * px + (k & 1);           \
                        const float *xp = a->x + ((b * Hi + y) * Wi + x) * Ci;                 \
                        dbo += gv;                                                             \
                        if (!last) {                                                           \
                            for (int kh = 0; kh < K; kh++)                                     \
                                for (int v = 0; v < NV; v++)                                   \
                                    acc[kh][v] += gv * *(const VT *)(xp + kh * Wi * Ci + v * V); \
                        } else {                                                               \
                            for (int kh = 0; kh < K; kh++)                                     \
                                for (int j = 0; j < L; j++) tail[kh * L + j] += gv * xp[kh * Wi * Ci + j]; \
                        }                                                                      \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            for (int kh = 0; kh < K; kh++)                                                     \
                for (int j = 0; j < L; j++)                                                    \
                    dw[(o * K + kh) * L + j] = acc[kh][j / V][j % V] + tail[kh * L + j];       \
            db[o] = dbo;                                                                       \
        }                                                                                      \
    }

DEFINE_WEIGHT_GRAD(weight_grad_v16x2, v16, 16, 2) /* rows of 30 (conv2) */

/* conv1's weight gradient (Ci = 1: rows of 5 taps): all six channels of a pooled pixel at once,
   6 x 5 accumulators, so the pixel's index bytes and gradients are read once and no
   accumulator waits for the one before; each image is first copied into a padded buffer, so
   the 8-lane row loads never read past it. */
static inline __attribute__((always_inline)) void weight_grad_conv1(
    const struct bwd_args *a, float *restrict dw, float *restrict db, int64_t begin,
    int64_t end, const int Hi, const int Wi, const int Ci, const int Co, const int K) {
    enum { N = 28, C = 6, T = 5, P = 12 };
    (void)Hi; (void)Wi; (void)Ci; (void)Co; (void)K;
    v8 acc[C][T];
    float dbs[C] = {0};
    float img[N * N + 8] __attribute__((aligned(64)));
    for (int o = 0; o < C; o++)
        for (int kh = 0; kh < T; kh++) acc[o][kh] = (v8){0};
    memset(img + N * N, 0, 8 * sizeof(float));
    for (int64_t b = begin; b < end; b++) {
        memcpy(img, a->x + b * N * N, N * N * sizeof(float));
        const uint8_t *ib = a->idx + b * P * P * C;
        const float *gb = a->g + b * a->gsb;
        for (int py = 0; py < P; py++) {
            for (int px = 0; px < P; px++) {
                const uint8_t *ip = ib + (py * P + px) * C;
                const float *gp = gb + py * a->gsh + px * a->gsw;
                for (int o = 0; o < C; o++) {
                    /* branch-free: a closed ReLU (k == 4) adds zeros at position 0 */
                    const int k = ip[o] & 7;
                    const float gv = k == 4 ? 0.0f : gp[o * a->gsc];
                    const float *xp = img + (2 * py + ((k >> 1) & 1)) * N + 2 * px + (k & 1);
                    dbs[o] += gv;
                    for (int kh = 0; kh < T; kh++) acc[o][kh] += gv * *(const v8 *)(xp + kh * N);
                }
            }
        }
    }
    for (int o = 0; o < C; o++) {
        for (int kh = 0; kh < T; kh++)
            for (int kw = 0; kw < T; kw++) dw[(o * T + kh) * T + kw] = acc[o][kh][kw];
        db[o] = dbs[o];
    }
}

static inline __attribute__((always_inline)) void input_grad(
    const struct bwd_args *a, int64_t begin, int64_t end,
    const int Hi, const int Wi, const int Ci, const int Co, const int K) {
    const int Hp = (Hi - K + 1) / 2, Wp = (Wi - K + 1) / 2, L = K * Ci;
    memset(a->dx + begin * Hi * Wi * Ci, 0, sizeof(float) * (end - begin) * Hi * Wi * Ci);
    for (int64_t b = begin; b < end; b++) {
        for (int py = 0; py < Hp; py++) {
            for (int px = 0; px < Wp; px++) {
                const float *gp = a->g + b * a->gsb + py * a->gsh + px * a->gsw;
                const uint8_t *ip = a->idx + ((b * Hp + py) * Wp + px) * Co;
                for (int o = 0; o < Co; o++) {
                    const int k = ip[o];
                    if (k == 4) continue;
                    const float gv = gp[o * a->gsc];
                    const int y = 2 * py + (k >> 1), x = 2 * px + (k & 1);
                    float *restrict dxp = a->dx + ((b * Hi + y) * Wi + x) * Ci;
                    const float *restrict wo = a->w + o * K * L;
                    for (int kh = 0; kh < K; kh++) {
                        for (int j = 0; j < L; j++) dxp[kh * Wi * Ci + j] += gv * wo[kh * L + j];
                    }
                }
            }
        }
    }
}

/* The input gradient with the weights' rows in vectors, for rows of K*Ci <= 32 (conv2): per
   pooled pixel and window position k, first the sum over the output channels whose maximum
   sits at k of g * weight (in registers), then one add of that sum into the input gradient.
   Each image is built in a padded local buffer, so the whole-vector adds may spill into the
   next pixels (adding zero lanes) and never touch another thread's image. */
static inline __attribute__((always_inline)) void input_grad_v16x2(
    const struct bwd_args *a, int64_t begin, int64_t end,
    const int Hi, const int Wi, const int Ci, const int Co, const int K) {
    const int Hp = (Hi - K + 1) / 2, Wp = (Wi - K + 1) / 2, L = K * Ci;
    float wpad[Co][K][32] __attribute__((aligned(64)));
    float local[Hi * Wi * Ci + 32] __attribute__((aligned(64)));
    memset(wpad, 0, sizeof(wpad));
    for (int o = 0; o < Co; o++)
        for (int kh = 0; kh < K; kh++)
            for (int j = 0; j < L; j++) wpad[o][kh][j] = a->w[(o * K + kh) * L + j];
    for (int64_t b = begin; b < end; b++) {
        memset(local, 0, sizeof(local));
        for (int py = 0; py < Hp; py++) {
            for (int px = 0; px < Wp; px++) {
                const float *gp = a->g + b * a->gsb + py * a->gsh + px * a->gsw;
                const uint8_t *ip = a->idx + ((b * Hp + py) * Wp + px) * Co;
                /* the channels grouped by window position without branches (the
                   positions are data, branching on them mispredicts) */
                int count[5] = {0, 0, 0, 0, 0}, members[5][Co];
                for (int o = 0; o < Co; o++) {
                    const int k = ip[o] & 7;
                    members[k][count[k]++] = o;
                }
                for (int k = 0; k < 4; k++) {
                    v16 acc[K][2];
                    if (!count[k]) continue;
                    for (int kh = 0; kh < K; kh++) acc[kh][0] = acc[kh][1] = (v16){0};
                    for (int n = 0; n < count[k]; n++) {
                        const int o = members[k][n];
                        const float gv = gp[o * a->gsc];
                        for (int kh = 0; kh < K; kh++) {
                            acc[kh][0] += gv * *(const v16 *)&wpad[o][kh][0];
                            acc[kh][1] += gv * *(const v16 *)&wpad[o][kh][16];
                        }
                    }
                    float *dxp = local + ((2 * py + (k >> 1)) * Wi + 2 * px + (k & 1)) * Ci;
                    for (int kh = 0; kh < K; kh++) {
                        *(v16 *)(dxp + kh * Wi * Ci) += acc[kh][0];
                        *(v16 *)(dxp + kh * Wi * Ci + 16) += acc[kh][1];
                    }
                }
            }
        }
        memcpy(a->dx + b * Hi * Wi * Ci, local, sizeof(float) * Hi * Wi * Ci);
    }
}

static void sum_partials(const float *partial, int threads, int64_t n, float *dw, float *db, int64_t nw) {
    for (int64_t i = 0; i < n; i++) {
        float s = partial[i];
        for (int t = 1; t < threads; t++) s += partial[t * n + i];
        if (i < nw) dw[i] = s; else db[i - nw] = s;
    }
}

/* ------------------------------------------------------------------ the two blocks */

#define DEFINE_BLOCK(NAME, HI, WI, CI, CO, K, WGRAD, XGRAD)                                                 \
    static void NAME##_pool_chunk(void *arg, int thread, int64_t begin, int64_t end) {         \
        (void)thread;                                                                          \
        pool_relu_chunk((const struct pool_args *)arg, begin, end, HI - K + 1, WI - K + 1, CO); \
    }                                                                                          \
    void NAME##_pool_relu_fwd(const float *y, float *out, uint8_t *idx, int64_t batch,        \
                              int64_t osb, int64_t osh, int64_t osw, int64_t osc, int threads) { \
        struct pool_args a = {y, out, idx, osb, osh, osw, osc};                                \
        parallel(NAME##_pool_chunk, &a, batch, threads);                                       \
    }                                                                                          \
    /* [begin, end) are chunks of the batch (GRAD_CHUNKS, or one per image if fewer) */       \
    static void NAME##_bwd_chunk(void *arg, int thread, int64_t begin, int64_t end) {          \
        (void)thread;                                                                          \
        const struct bwd_args *a = (const struct bwd_args *)arg;                               \
        const int64_t chunks = a->batch < GRAD_CHUNKS ? a->batch : GRAD_CHUNKS;                \
        for (int64_t c = begin; c < end; c++) {                                                \
            const int64_t b0 = a->batch * c / chunks, b1 = a->batch * (c + 1) / chunks;        \
            float *dw = a->partial + c * (CO * K * K * CI + CO);                               \
            WGRAD(a, dw, dw + CO * K * K * CI, b0, b1, HI, WI, CI, CO, K);                     \
            if (a->dx) XGRAD(a, b0, b1, HI, WI, CI, CO, K);                                    \
        }                                                                                      \
    }                                                                                          \
    int NAME##_conv_pool_bwd(const float *g, int64_t gsb, int64_t gsh, int64_t gsw, int64_t gsc, \
                             const uint8_t *idx, const float *x, const float *w, float *dw,    \
                             float *db, float *dx, int64_t batch, int threads) {               \
        const int64_t nw = (int64_t)CO * K * K * CI, n = nw + CO;                              \
        const int64_t chunks = batch < GRAD_CHUNKS ? batch : GRAD_CHUNKS;                      \
        float *partial = (float *)malloc(sizeof(float) * n * chunks);                          \
        if (!partial) return 1;                                                                \
        struct bwd_args a = {g, gsb, gsh, gsw, gsc, idx, x, w, dx, partial, batch};             \
        parallel(NAME##_bwd_chunk, &a, chunks, threads);                                       \
        sum_partials(partial, (int)chunks, n, dw, db, nw);                                     \
        free(partial);                                                                         \
        return 0;                                                                              \
    }

/* conv1: (B, 28, 28, 1) -> conv 5x5 -> (B, 24, 24, 6) -> pool -> (B, 12, 12, 6) */
DEFINE_BLOCK(conv1, 28, 28, 1, 6, 5, weight_grad_conv1, input_grad)
/* conv2: (B, 12, 12, 6) -> conv 5x5 -> (B, 8, 8, 16) -> pool -> (B, 4, 4, 16) */
DEFINE_BLOCK(conv2, 12, 12, 6, 16, 5, weight_grad_v16x2, input_grad_v16x2)

/* ------------------------------------------------------------------ the head: linear -> dropout -> ReLU -> linear

   logits = relu((x W1^T + b1) * noise) W2^T + b2 for a batch x (B, I), W1 (HEAD_H, I), W2 (O, HEAD_H)
   and dropout's scaled mask `noise` (B, HEAD_H), drawn by the caller as torch's dropout draws it;
   I a multiple of 128, O at most 16 (the seed model: I = 256, HEAD_H = 96, O = 10). The forward
   keeps d = (x W1^T + b1) * noise (B, HEAD_H) for the backward. Every output element is one sum
   in a fixed order (bias first, then the inner index ascending) computed by one thread, so the
   results depend on the inputs only, not on the thread count. Rows are held in registers as
   vectors of 16 lanes, a few rows at once, so each loaded weight vector serves several FMAs. */

#define HEAD_H 96
#define HEAD_NV (HEAD_H / 16)
#define HEAD_ROWS 4 /* forward: batch rows per pass (HEAD_ROWS * HEAD_NV accumulators) */

struct head_args {
    const float *x, *w1, *b1, *w2, *b2, *noise, *g;
    float *w1t;   /* (I, HEAD_H): W1 transposed, for the forward */
    float *w2t;   /* (HEAD_H, 16): W2 transposed, zero-padded to 16 classes */
    float *b2t;   /* (16): b2, zero-padded */
    float *d, *logits, *dw1, *db1, *dw2, *db2, *dx, *dh;
    int64_t batch, in, out;
};

static void head_fwd_chunk(void *arg, int thread, int64_t begin, int64_t end) {
    (void)thread;
    const struct head_args *a = (const struct head_args *)arg;
    const int64_t I = a->in, O = a->out;
    for (int64_t b0 = begin; b0 < end; b0 += HEAD_ROWS) {
        const int rows = end - b0 < HEAD_ROWS ? (int)(end - b0) : HEAD_ROWS;
        v16 acc[HEAD_ROWS][HEAD_NV];
        for (int r = 0; r < HEAD_ROWS; r++)
            for (int v = 0; v < HEAD_NV; v++) acc[r][v] = *(const v16 *)(a->b1 + 16 * v);
        const float *xr[HEAD_ROWS];
        for (int r = 0; r < HEAD_ROWS; r++) xr[r] = a->x + (b0 + (r < rows ? r : 0)) * I;
        for (int64_t k = 0; k < I; k++) {
            const float *wk = a->w1t + k * HEAD_H;
            for (int v = 0; v < HEAD_NV; v++) {
                const v16 w = *(const v16 *)(wk + 16 * v);
                for (int r = 0; r < HEAD_ROWS; r++) acc[r][v] += xr[r][k] * w;
            }
        }
        /* d = h * noise; logits = b2 + relu(d) W2^T, the O classes in the lanes of one vector */
        float relu[HEAD_ROWS][HEAD_H];
        v16 out[HEAD_ROWS];
        for (int r = 0; r < HEAD_ROWS; r++) {
            const int64_t b = b0 + (r < rows ? r : 0);
            const float *nb = a->noise + b * HEAD_H;
            const v16 zero = {0};
            for (int v = 0; v < HEAD_NV; v++) {
                const v16 dv = acc[r][v] * *(const v16 *)(nb + 16 * v);
                if (r < rows) *(v16 *)(a->d + b * HEAD_H + 16 * v) = dv;
                *(v16 *)(relu[r] + 16 * v) = (v16)((v16i)(dv > zero) & (v16i)dv);
            }
            out[r] = *(const v16 *)a->b2t;
        }
        for (int j = 0; j < HEAD_H; j++) {
            const v16 w = *(const v16 *)(a->w2t + 16 * j);
            for (int r = 0; r < HEAD_ROWS; r++) out[r] += relu[r][j] * w;
        }
        for (int r = 0; r < rows; r++) {
            float lanes[16];
            memcpy(lanes, &out[r], sizeof(lanes));
            memcpy(a->logits + (b0 + r) * O, lanes, sizeof(float) * O);
        }
    }
}

static void transpose_chunk(void *arg, int thread, int64_t begin, int64_t end) {
    (void)thread;
    const struct head_args *a = (const struct head_args *)arg;
    for (int64_t k = begin; k < end; k++)
        for (int64_t j = 0; j < HEAD_H; j++) a->w1t[k * HEAD_H + j] = a->w1[j * a->in + k];
    if (begin == 0) {
        memset(a->w2t, 0, sizeof(float) * 16 * (HEAD_H + 1));
        for (int64_t j = 0; j < HEAD_H; j++)
            for (int64_t c = 0; c < a->out; c++) a->w2t[16 * j + c] = a->w2[c * HEAD_H + j];
        for (int64_t c = 0; c < a->out; c++) a->b2t[c] = a->b2[c];
    }
}

/* x (B, I), w1 (HEAD_H, I), b1 (HEAD_H), w2 (O, HEAD_H), b2 (O), noise (B, HEAD_H) ->
   d (B, HEAD_H), logits (B, O); contiguous rows. Returns 1 when out of memory, 2 for sizes
   this kernel does not handle. */
int head_fwd(const float *x, const float *w1, const float *b1, const float *w2, const float *b2,
             const float *noise, float *d, float *logits, int64_t batch, int64_t in, int64_t hidden,
             int64_t out, int threads) {
    if (hidden != HEAD_H || in % 128 || out < 1 || out > 16) return 2;
    float *w1t = (float *)malloc(sizeof(float) * (in * HEAD_H + 16 * (HEAD_H + 1)));
    if (!w1t) return 1;
    struct head_args a = {.x = x, .w1 = w1, .b1 = b1, .w2 = w2, .b2 = b2, .noise = noise, .w1t = w1t,
                          .w2t = w1t + in * HEAD_H, .b2t = w1t + in * HEAD_H + 16 * HEAD_H, .d = d, .logits = logits, .batch = batch, .in = in, .out = out};
    parallel(transpose_chunk, &a, in, threads);
    parallel(head_fwd_chunk, &a, batch, threads);
    free(w1t);
    return 0;
}

/* rows b of dh = (d > 0 ? g W2 : 0) * noise, and of dx = dh W1, two rows and 128 columns of
   dx at a time */
static void head_bwd_rows_chunk(void *arg, int thread, int64_t begin, int64_t end) {
    (void)thread;
    const struct head_args *a = (const struct head_args *)arg;
    const int64_t I = a->in, O = a->out;
    for (int64_t b = begin; b < end; b++) {
        float *hb = a->dh + b * HEAD_H;
        const float *gb = a->g + b * O;
        const float *db = a->d + b * HEAD_H;
        const float *nb = a->noise + b * HEAD_H;
        v16 acc[HEAD_NV];
        for (int v = 0; v < HEAD_NV; v++) acc[v] = (v16){0};
        for (int c = 0; c < O; c++)
            for (int v = 0; v < HEAD_NV; v++) acc[v] += gb[c] * *(const v16 *)(a->w2 + c * HEAD_H + 16 * v);
        for (int v = 0; v < HEAD_NV; v++) {
            const v16 dv = *(const v16 *)(db + 16 * v);
            const v16 zero = {0};
            v16 open = (v16)(dv > zero);
            *(v16 *)(hb + 16 * v) = (v16)((v16i)open & (v16i)acc[v]) * *(const v16 *)(nb + 16 * v);
        }
    }
    if (!a->dx) return;
    for (int64_t b0 = begin; b0 < end; b0 += 2) {
        const int rows = end - b0 < 2 ? 1 : 2;
        const float *h0 = a->dh + b0 * HEAD_H, *h1 = a->dh + (b0 + rows - 1) * HEAD_H;
        for (int64_t k0 = 0; k0 < I; k0 += 128) {
            v16 acc0[8], acc1[8];
            for (int v = 0; v < 8; v++) acc0[v] = acc1[v] = (v16){0};
            for (int j = 0; j < HEAD_H; j++) {
                const float *wj = a->w1 + j * I + k0;
                const float s0 = h0[j], s1 = h1[j];
                for (int v = 0; v < 8; v++) {
                    const v16 w = *(const v16 *)(wj + 16 * v);
                    acc0[v] += s0 * w;
                    acc1[v] += s1 * w;
                }
            }
            for (int v = 0; v < 8; v++) *(v16 *)(a->dx + b0 * I + k0 + 16 * v) = acc0[v];
            if (rows == 2)
                for (int v = 0; v < 8; v++) *(v16 *)(a->dx + (b0 + 1) * I + k0 + 16 * v) = acc1[v];
        }
    }
}

/* rows j of dW1 = dh^T x and db1 = sum_b dh, two rows and 128 columns at a time */
static void head_bwd_weights_chunk(void *arg, int thread, int64_t begin, int64_t end) {
    (void)thread;
    const struct head_args *a = (const struct head_args *)arg;
    const int64_t I = a->in, B = a->batch;
    for (int64_t j = begin; j < end; j++) {
        float s = 0.0f;
        for (int64_t b = 0; b < B; b++) s += a->dh[b * HEAD_H + j];
        a->db1[j] = s;
    }
    for (int64_t j0 = begin; j0 < end; j0 += 2) {
        const int rows = end - j0 < 2 ? 1 : 2;
        const int64_t j1 = j0 + rows - 1;
        for (int64_t k0 = 0; k0 < I; k0 += 128) {
            v16 acc0[8], acc1[8];
            for (int v = 0; v < 8; v++) acc0[v] = acc1[v] = (v16){0};
            for (int64_t b = 0; b < B; b++) {
                const float *xb = a->x + b * I + k0;
                const float s0 = a->dh[b * HEAD_H + j0], s1 = a->dh[b * HEAD_H + j1];
                for (int v = 0; v < 8; v++) {
                    const v16 xv = *(const v16 *)(xb + 16 * v);
                    acc0[v] += s0 * xv;
                    acc1[v] += s1 * xv;
                }
            }
            for (int v = 0; v < 8; v++) *(v16 *)(a->dw1 + j0 * I + k0 + 16 * v) = acc0[v];
            if (rows == 2)
                for (int v = 0; v < 8; v++) *(v16 *)(a->dw1 + j1 * I + k0 + 16 * v) = acc1[v];
        }
    }
}

/* dW2 = g^T relu(d), db2 = sum_b g */
static void head_bwd_last(const struct head_args *a) {
    const int64_t O = a->out, B = a->batch;
    for (int64_t c = 0; c < O; c++) {
        v16 acc[HEAD_NV];
        float s = 0.0f;
        for (int v = 0; v < HEAD_NV; v++) acc[v] = (v16){0};
        for (int64_t b = 0; b < B; b++) {
            const float gv = a->g[b * O + c];
            const float *db = a->d + b * HEAD_H;
            s += gv;
            for (int v = 0; v < HEAD_NV; v++) {
                const v16 dv = *(const v16 *)(db + 16 * v);
                const v16 zero = {0};
                acc[v] += gv * (v16)((v16i)(dv > zero) & (v16i)dv);
            }
        }
        for (int v = 0; v < HEAD_NV; v++) *(v16 *)(a->dw2 + c * HEAD_H + 16 * v) = acc[v];
        a->db2[c] = s;
    }
}

/* From the logits' gradient g (B, O) and the forward's d: dw1 (HEAD_H, I), db1 (HEAD_H),
   dw2 (O, HEAD_H), db2 (O) and, when dx is not NULL, dx (B, I). Returns 1 when out of memory,
   2 for sizes this kernel does not handle. */
int head_bwd(const float *g, const float *x, const float *w1, const float *w2, const float *noise,
             const float *d, float *dw1, float *db1, float *dw2, float *db2, float *dx,
             int64_t batch, int64_t in, int64_t hidden, int64_t out, int threads) {
    if (hidden != HEAD_H || in % 128 || out < 1 || out > 16) return 2;
    float *dh = (float *)malloc(sizeof(float) * batch * HEAD_H);
    if (!dh) return 1;
    struct head_args a = {.x = x, .w1 = w1, .w2 = w2, .noise = noise, .g = g, .d = (float *)d, .dw1 = dw1,
                          .db1 = db1, .dw2 = dw2, .db2 = db2, .dx = dx, .dh = dh,
                          .batch = batch, .in = in, .out = out};
    parallel(head_bwd_rows_chunk, &a, batch, threads);
    parallel(head_bwd_weights_chunk, &a, HEAD_H, threads);
    head_bwd_last(&a);
    free(dh);
    return 0;
}
