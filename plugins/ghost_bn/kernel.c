/* Ghost batch norm kernels (float32, CPU), compiled on first use by compiled.py and called by ctypes.

   Layout: x is a contiguous [B, C, S] float32 array (S = product of the spatial sizes, 1 for [B, C])
   with B = g * m: m equal ghost batches of g examples. Ghost k holds the rows k * g + i (i < g) in
   the contiguous partition, the rows i * m + k in the strided one (functional.py's two
   partitions), so both paths put the same examples together.

   Why a kernel: torch has no ghost batch norm, and its one-call emulation (the ghosts folded into
   channels) runs batch_norm on m times more, m times shorter channels, which costs up to 2.9x plain
   BatchNorm on [512, 256] activations. Here each ghost batch (or block of columns) is normalised
   while it is in cache: two passes for mean and variance, one for the output; backward the same.
   Only the first pass reads memory. (Streaming stores for large outputs were measured and removed:
   faster for the layer alone, 2-9% slower for a training step; see benchmarks/ghost_bn.)

   Three layouts of the work, by S: [B, C] (S = 1) and short channels (S < 64) in blocks of
   columns of the folded [g, m * C * S] matrix, long channels one ghost per work item.

   Statistics: two-pass mean and biased variance per (ghost, channel); sums over a channel's
   spatial values accumulate in double. Results match torch's batch_norm to float32 rounding.
   Threads: OpenMP over ghosts or column blocks, sharing torch's OpenMP runtime, so
   torch.set_num_threads applies; each work item is summed by one thread in a fixed order, so
   results do not depend on the thread count. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#define LITPLUG_GBN_ABI 6

int litplug_gbn_abi(void) { return LITPLUG_GBN_ABI; }

/* Row i of the ghost whose first row is `first`, its rows `step` apart (1: contiguous, m: strided). */
#define ROW(base, i) ((base) + (first + (i) * step) * C * S)

/* Below this many values one thread does the work: waking more costs more than it saves on
   tiny activations. The same threshold as torch's own CPU kernels (at::internal::GRAIN_SIZE). */
#define PARALLEL_MIN_VALUES 32768

static inline int worth_threads(int64_t values) { return values >= PARALLEL_MIN_VALUES; }

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- [B, C] inputs (S == 1) --------------------------------------------------------------------
   Strided partition: the rows of ghost k side by side form one folded matrix [g, N = m * C]: folded
   row i is x's rows i * m .. i * m + m - 1 (contiguous), column j = k * C + c is ghost k's channel
   c. Contiguous partition: ghost k is itself a matrix [g, N = C], x's rows k * g .. k * g + g - 1.
   Either way there are `mats` matrices (1 or m) of g rows of N values, matrix t at x + t * g * N,
   and its column j is statistics column J = t * N + j (= k * C + c); the statistics are per
   column. A work item is a block of BLOCK columns of one matrix down its g rows: its
   accumulators and per-column coefficients (a few KB) stay in L1 while the rows stream by, and
   each column is summed by one thread in row order, so results do not depend on the thread count.
   Measured against the alternatives (x not in cache, and in a warm loop, [512, 256]): whole-row
   streaming re-reads m * C-long coefficient arrays for every row (1.5x slower warm at 64 ghosts);
   one ghost's rows at a time (m rows apart) or channel blocks across ghosts were 20-60% slower;
   blocks of 1024-4096 columns were within noise of 512. */
#define BLOCK 512

/* Narrower blocks for small matrices: with fewer than two blocks per thread the threads barely
   share the work (benchmarks/ghost_bn, 2 threads: [512, 256] in ghosts of 128, i.e. 2 blocks of
   512 columns, ran forward + backward in 1.6-1.9x the time of 4 blocks of 256; [256, 256] in
   ghosts of 128, 1 block: 1.6x the time of 4 blocks of 128), so the width is halved down to
   MIN_BLOCK until each thread has two. Results do not change: every column is still summed by one
   thread in row order. */
#ifndef MIN_BLOCK /* benchmarks/ghost_bn builds a variant without narrowing (MIN_BLOCK = BLOCK) */
#define MIN_BLOCK 64
#endif

static int64_t columns_per_block(int64_t mats, int64_t N, int64_t values) {
    int64_t width = BLOCK;
#if defined(_OPENMP)
    if (worth_threads(values)) {
        const int64_t wanted = 2 * (int64_t)omp_get_max_threads();
        while (width > MIN_BLOCK && mats * ((N + width - 1) / width) < wanted) width /= 2;
    }
#else
    (void)mats, (void)N, (void)values;
#endif
    return width;
}

static void forward_columns(const float *x, const float *weight, const float *bias, float *y,
                            float *means, float *invstds, float *vars, int64_t mats, int64_t g,
                            int64_t N, int64_t C, float eps) {
    const float inv_n = 1.f / (float)g;
    const int64_t values = mats * g * N, width = columns_per_block(mats, N, values);
    const int64_t per_mat = (N + width - 1) / width, num_blocks = mats * per_mat;
#pragma omp parallel for schedule(static) if (worth_threads(values))
    for (int64_t block = 0; block < num_blocks; ++block) {
        const int64_t t = block / per_mat, j0 = (block % per_mat) * width, len = min64(width, N - j0);
        const int64_t J0 = t * N + j0;
        const float *xt = x + t * g * N;
        float *yt = y + t * g * N;
        float *mean = means + J0, *var = vars + J0, *invstd = invstds + J0;
        float scale[BLOCK], shift[BLOCK];
        for (int64_t j = 0; j < len; ++j) { mean[j] = 0.f; var[j] = 0.f; }
        for (int64_t i = 0; i < g; ++i) {
            const float *row = xt + i * N + j0;
            for (int64_t j = 0; j < len; ++j) mean[j] += row[j];
        }
        for (int64_t j = 0; j < len; ++j) mean[j] *= inv_n;
        for (int64_t i = 0; i < g; ++i) {
            const float *row = xt + i * N + j0;
            for (int64_t j = 0; j < len; ++j) { const float d = row[j] - mean[j]; var[j] += d * d; }
        }
        /* Column J0 + j is channel (J0 + j) % C: walk runs of consecutive channels so the loop
           vectorises (a modulo per column cost more than the rest of the kernel at 64 ghosts). */
        for (int64_t j = 0, c0 = J0 % C; j < len; c0 = 0) {
            const int64_t run = min64(len - j, C - c0);
            const float *w = weight ? weight + c0 : NULL, *b = bias ? bias + c0 : NULL;
            for (int64_t t = 0; t < run; ++t, ++j) {
                var[j] *= inv_n;
                invstd[j] = 1.f / sqrtf(var[j] + eps);
                scale[j] = (w ? w[t] : 1.f) * invstd[j];
                shift[j] = (b ? b[t] : 0.f) - mean[j] * scale[j];
            }
        }
        for (int64_t i = 0; i < g; ++i) {
            const float *row = xt + i * N + j0;
            float *out = yt + i * N + j0;
            for (int64_t j = 0; j < len; ++j) out[j] = row[j] * scale[j] + shift[j];
        }
    }
}

static void backward_columns(const float *dy, const float *x, const float *weight,
                             const float *means, const float *invstds, float *dx, float *sum_dy,
                             float *sum_dy_xhat, int64_t mats, int64_t g, int64_t N, int64_t C) {
    const float inv_n = 1.f / (float)g;
    const int64_t values = mats * g * N, width = columns_per_block(mats, N, values);
    const int64_t per_mat = (N + width - 1) / width, num_blocks = mats * per_mat;
#pragma omp parallel for schedule(static) if (worth_threads(values))
    for (int64_t block = 0; block < num_blocks; ++block) {
        const int64_t t = block / per_mat, j0 = (block % per_mat) * width, len = min64(width, N - j0);
        const int64_t J0 = t * N + j0, at = t * g * N + j0;
        const float *mean = means + J0, *invstd = invstds + J0;
        float *s1 = sum_dy + J0, *s2 = sum_dy_xhat + J0;
        float ca[BLOCK], cb[BLOCK], cc[BLOCK];
        for (int64_t j = 0; j < len; ++j) { s1[j] = 0.f; s2[j] = 0.f; }
        for (int64_t i = 0; i < g; ++i) {
            const float *xr = x + at + i * N, *dr = dy + at + i * N;
            for (int64_t j = 0; j < len; ++j) { s1[j] += dr[j]; s2[j] += dr[j] * (xr[j] - mean[j]); }
        }
        /* dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) = ca * dy + cb * x + cc. */
        for (int64_t j = 0, c0 = J0 % C; j < len; c0 = 0) {
            const int64_t run = min64(len - j, C - c0);
            const float *w = weight ? weight + c0 : NULL;
            for (int64_t t = 0; t < run; ++t, ++j) {
                const float is = invstd[j];
                s2[j] *= is; /* now sum(dy * xhat) */
                ca[j] = (w ? w[t] : 1.f) * is;
                cb[j] = -ca[j] * is * s2[j] * inv_n;
                cc[j] = -ca[j] * s1[j] * inv_n - cb[j] * mean[j];
            }
        }
        for (int64_t i = 0; i < g; ++i) {
            const float *xr = x + at + i * N, *dr = dy + at + i * N;
            float *out = dx + at + i * N;
            for (int64_t j = 0; j < len; ++j) out[j] = ca[j] * dr[j] + cb[j] * xr[j] + cc[j];
        }
    }
}

/* ---- output loops and per-thread scratch (the [B, C, S] paths) --------------------------------- */

/* o = p * a + b and o = a * d + b * p + e, with coefficients per run (scalars) or per value
   (arrays). No fused multiply-add with GCC (-std=c99 turns contraction off). */
static inline void affine_run(const float *p, float *o, int64_t n, float a, float b) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) o[t] = p[t] * a + b;
}

static inline void affine_values(const float *p, float *o, int64_t n, const float *a, const float *b) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) o[t] = p[t] * a[t] + b[t];
}

static inline void grad_run(const float *d, const float *p, float *o, int64_t n, float a, float b,
                            float e) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) o[t] = a * d[t] + b * p[t] + e;
}

static inline void grad_values(const float *d, const float *p, float *o, int64_t n, const float *a,
                               const float *b, const float *e) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) o[t] = a[t] * d[t] + b[t] * p[t] + e[t];
}

/* One thread's scratch inside a parallel region; on failure sets *failed for every thread to see
   after the next barrier (the callers then skip the work and return 1). */
static void *thread_scratch(size_t bytes, int *failed) {
    void *p = malloc(bytes);
    if (!p) {
#pragma omp atomic write
        *failed = 1;
    }
    return p;
}

/* ---- [B, C, S] inputs with short channels (1 < S < SHORT_CHANNEL) ------------------------------
   The columns layout above, with channels of S adjacent columns: statistics column J = k * C + c
   is the matrix columns J * S .. J * S + S - 1 (t * N + j = (k * C + c) * S + s, N = m * C * S
   strided, C * S contiguous). A work item is a block of whole channels (about BLOCK columns) of
   one matrix; each column is summed down the g rows in float (every add a full vector, as in
   the [B, C] path), then each channel's S column sums are added in double. Per-value copies of the
   channel's mean and coefficients let every pass run on whole vectors. Against one ghost at a time
   with a horizontal sum per row and channel (the long-channel path below), forward + backward:
   0.5-0.6x the time at S = 16 and 25, 0.63x at 36, 0.9x at 49; from S = 64 on the long-channel path
   is as fast or faster (1.24x at S = 144 this way). */
#ifndef SHORT_CHANNEL /* benchmarks/ghost_bn builds variants with other values */
#define SHORT_CHANNEL 64
#endif

/* Columns per work item: as many whole channels as fit in BLOCK columns (S < SHORT_CHANNEL < BLOCK). */
static int64_t block_columns(int64_t S) { return S * (BLOCK / S); }

/* sums[r] = the sum of channel r's S adjacent column totals (columns r * S .. r * S + S - 1). */
static void channel_sums(const float *totals, int64_t channels, int64_t S, double *sums) {
    for (int64_t r = 0; r < channels; ++r) {
        double sum = 0.0;
        for (int64_t s = 0; s < S; ++s) sum += totals[r * S + s];
        sums[r] = sum;
    }
}

/* values[r * S + s] = per_channel[r] for s < S. */
static void spread(const float *per_channel, int64_t channels, int64_t S, float *values) {
    for (int64_t r = 0; r < channels; ++r)
        for (int64_t s = 0; s < S; ++s) values[r * S + s] = per_channel[r];
}

/* Returns 1 when a thread could not allocate its scratch. */
static int forward_short_channels(const float *x, const float *weight, const float *bias, float *y,
                                  float *means, float *invstds, float *vars, int64_t mats,
                                  int64_t g, int64_t N, int64_t C, int64_t S, float eps) {
    const int64_t width = block_columns(S), per_mat = (N + width - 1) / width;
    const int64_t num_blocks = mats * per_mat, values = mats * g * N;
    const double n = (double)(g * S);
    int failed = 0;
#pragma omp parallel if (worth_threads(values))
    {
        const int64_t most = width / S; /* channels per block */
        const size_t floats = 3 * width + 2 * most;
        double *sums = thread_scratch(sizeof(double) * most + sizeof(float) * floats, &failed);
#pragma omp barrier
        if (!failed) {
            float *acc = (float *)(sums + most), *a = acc + width, *b = a + width;
            float *scale = b + width, *shift = scale + most; /* per channel */
#pragma omp for schedule(static)
            for (int64_t block = 0; block < num_blocks; ++block) {
                const int64_t mat = block / per_mat, j0 = (block % per_mat) * width;
                const int64_t len = min64(width, N - j0), channels = len / S;
                const int64_t q0 = (mat * N + j0) / S; /* stats index k * C + c of its first channel */
                const float *xm = x + mat * g * N + j0;
                float *ym = y + mat * g * N + j0;
                float *mean = means + q0, *var = vars + q0, *invstd = invstds + q0;
                for (int64_t t = 0; t < len; ++t) acc[t] = 0.f;
                for (int64_t i = 0; i < g; ++i) {
                    const float *row = xm + i * N;
#pragma omp simd
                    for (int64_t t = 0; t < len; ++t) acc[t] += row[t];
                }
                channel_sums(acc, channels, S, sums);
                for (int64_t r = 0; r < channels; ++r) mean[r] = (float)(sums[r] / n);
                spread(mean, channels, S, a);
                for (int64_t t = 0; t < len; ++t) acc[t] = 0.f;
                for (int64_t i = 0; i < g; ++i) {
                    const float *row = xm + i * N;
#pragma omp simd
                    for (int64_t t = 0; t < len; ++t) {
                        const float d = row[t] - a[t];
                        acc[t] += d * d;
                    }
                }
                channel_sums(acc, channels, S, sums);
                for (int64_t r = 0; r < channels; ++r) {
                    const int64_t c = (q0 + r) % C;
                    var[r] = (float)(sums[r] / n);
                    invstd[r] = 1.f / sqrtf(var[r] + eps);
                    scale[r] = (weight ? weight[c] : 1.f) * invstd[r];
                    shift[r] = (bias ? bias[c] : 0.f) - mean[r] * scale[r];
                }
                spread(scale, channels, S, a);
                spread(shift, channels, S, b);
                for (int64_t i = 0; i < g; ++i) affine_values(xm + i * N, ym + i * N, len, a, b);
            }
        }
        free(sums);
    }
    return failed;
}

static int backward_short_channels(const float *dy, const float *x, const float *weight,
                                   const float *means, const float *invstds, float *dx,
                                   float *sum_dy, float *sum_dy_xhat, int64_t mats, int64_t g,
                                   int64_t N, int64_t C, int64_t S) {
    const int64_t width = block_columns(S), per_mat = (N + width - 1) / width;
    const int64_t num_blocks = mats * per_mat, values = mats * g * N;
    const float inv_n = 1.f / (float)(g * S);
    int failed = 0;
#pragma omp parallel if (worth_threads(values))
    {
        const int64_t most = width / S;
        const size_t floats = 5 * width + 3 * most;
        double *sums = thread_scratch(sizeof(double) * 2 * most + sizeof(float) * floats, &failed);
#pragma omp barrier
        if (!failed) {
            float *s1 = (float *)(sums + 2 * most), *s2 = s1 + width;
            float *ca = s2 + width, *cb = ca + width, *cc = cb + width;
            float *a = cc + width, *b = a + most, *e = b + most; /* per channel */
#pragma omp for schedule(static)
            for (int64_t block = 0; block < num_blocks; ++block) {
                const int64_t mat = block / per_mat, j0 = (block % per_mat) * width;
                const int64_t len = min64(width, N - j0), channels = len / S;
                const int64_t q0 = (mat * N + j0) / S, base = mat * g * N + j0;
                spread(means + q0, channels, S, ca);
                for (int64_t t = 0; t < len; ++t) { s1[t] = 0.f; s2[t] = 0.f; }
                for (int64_t i = 0; i < g; ++i) {
                    const float *xr = x + base + i * N, *dr = dy + base + i * N;
#pragma omp simd
                    for (int64_t t = 0; t < len; ++t) {
                        s1[t] += dr[t];
                        s2[t] += dr[t] * (xr[t] - ca[t]);
                    }
                }
                channel_sums(s1, channels, S, sums);
                channel_sums(s2, channels, S, sums + most);
                /* dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) = ca * dy + cb * x + cc */
                for (int64_t r = 0; r < channels; ++r) {
                    const int64_t q = q0 + r, c = q % C;
                    const float is = invstds[q], t1 = (float)sums[r], t2 = (float)sums[most + r] * is;
                    sum_dy[q] = t1;
                    sum_dy_xhat[q] = t2;
                    a[r] = (weight ? weight[c] : 1.f) * is;
                    b[r] = -a[r] * is * t2 * inv_n;
                    e[r] = -a[r] * t1 * inv_n - b[r] * means[q];
                }
                spread(a, channels, S, ca);
                spread(b, channels, S, cb);
                spread(e, channels, S, cc);
                for (int64_t i = 0; i < g; ++i) {
                    const int64_t at = base + i * N;
                    grad_values(dy + at, x + at, dx + at, len, ca, cb, cc);
                }
            }
        }
        free(sums);
    }
    return failed;
}

/* ---- [B, C, S] inputs with long channels (S >= SHORT_CHANNEL) ---------------------------------
   One work item per ghost: its g rows of C * S values are normalised while they are in cache.
   (Splitting large ghosts into channel blocks that fit in L2 was measured: no faster, with g up to
   256 and ghosts of 2 MB.) */

/* mean[c] and biased var[c] of the ghost of g rows from row `first`, `step` apart; acc: C doubles
   of scratch. */
static void ghost_moments(const float *x, int64_t C, int64_t S, int64_t first, int64_t step,
                          int64_t g, float *mean, float *var, double *acc) {
    const double n = (double)(g * S);
    for (int64_t c = 0; c < C; ++c) acc[c] = 0.0;
    for (int64_t i = 0; i < g; ++i) {
        const float *row = ROW(x, i);
        for (int64_t c = 0; c < C; ++c) {
            const float *p = row + c * S;
            float part = 0.f;
#pragma omp simd reduction(+ : part)
            for (int64_t s = 0; s < S; ++s) part += p[s];
            acc[c] += part;
        }
    }
    for (int64_t c = 0; c < C; ++c) { mean[c] = (float)(acc[c] / n); acc[c] = 0.0; }
    for (int64_t i = 0; i < g; ++i) {
        const float *row = ROW(x, i);
        for (int64_t c = 0; c < C; ++c) {
            const float *p = row + c * S, mu = mean[c];
            float part = 0.f;
#pragma omp simd reduction(+ : part)
            for (int64_t s = 0; s < S; ++s) { const float d = p[s] - mu; part += d * d; }
            acc[c] += part;
        }
    }
    for (int64_t c = 0; c < C; ++c) var[c] = (float)(acc[c] / n);
}

/* Returns 1 when a thread could not allocate its scratch. */
static int forward_ghosts(const float *x, const float *weight, const float *bias, float *y,
                          float *means, float *invstds, float *vars, int64_t C, int64_t S,
                          int64_t m, int64_t g, int contiguous, float eps) {
    const int64_t values = g * m * C * S;
    int failed = 0;
#pragma omp parallel if (worth_threads(values))
    {
        double *acc = thread_scratch(sizeof(double) * C + sizeof(float) * 2 * C, &failed);
        float *scale = acc ? (float *)(acc + C) : NULL, *shift = scale ? scale + C : NULL;
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t k = 0; k < m; ++k) {
                const int64_t first = contiguous ? k * g : k, step = contiguous ? 1 : m;
                float *mean = means + k * C, *var = vars + k * C, *invstd = invstds + k * C;
                ghost_moments(x, C, S, first, step, g, mean, var, acc);
                for (int64_t c = 0; c < C; ++c) {
                    invstd[c] = 1.f / sqrtf(var[c] + eps);
                    scale[c] = (weight ? weight[c] : 1.f) * invstd[c];
                    shift[c] = (bias ? bias[c] : 0.f) - mean[c] * scale[c];
                }
                for (int64_t i = 0; i < g; ++i) {
                    const float *row = ROW(x, i);
                    float *out = ROW(y, i);
                    for (int64_t c = 0; c < C; ++c)
                        affine_run(row + c * S, out + c * S, S, scale[c], shift[c]);
                }
            }
        }
        free(acc);
    }
    return failed;
}

static int backward_ghosts(const float *dy, const float *x, const float *weight,
                           const float *means, const float *invstds, float *dx, float *sum_dy,
                           float *sum_dy_xhat, int64_t C, int64_t S, int64_t m, int64_t g,
                           int contiguous) {
    const float inv_n = 1.f / (float)(g * S);
    const int64_t values = g * m * C * S;
    int failed = 0;
#pragma omp parallel if (worth_threads(values))
    {
        double *acc = thread_scratch(sizeof(double) * 2 * C + sizeof(float) * 3 * C, &failed);
        float *coef = acc ? (float *)(acc + 2 * C) : NULL;
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t k = 0; k < m; ++k) {
                const int64_t first = contiguous ? k * g : k, step = contiguous ? 1 : m;
                const float *mean = means + k * C, *invstd = invstds + k * C;
                double *a1 = acc, *a2 = acc + C;
                for (int64_t c = 0; c < 2 * C; ++c) acc[c] = 0.0;
                for (int64_t i = 0; i < g; ++i) {
                    const float *xr = ROW(x, i), *dr = ROW(dy, i);
                    for (int64_t c = 0; c < C; ++c) {
                        const float *p = xr + c * S, *d = dr + c * S, mu = mean[c];
                        float p1 = 0.f, p2 = 0.f;
#pragma omp simd reduction(+ : p1, p2)
                        for (int64_t s = 0; s < S; ++s) { p1 += d[s]; p2 += d[s] * (p[s] - mu); }
                        a1[c] += p1;
                        a2[c] += p2;
                    }
                }
                float *ca = coef, *cb = coef + C, *cc = coef + 2 * C;
                for (int64_t c = 0; c < C; ++c) {
                    const float is = invstd[c], s1 = (float)a1[c], s2 = (float)a2[c] * is;
                    sum_dy[k * C + c] = s1;
                    sum_dy_xhat[k * C + c] = s2;
                    ca[c] = (weight ? weight[c] : 1.f) * is;
                    cb[c] = -ca[c] * is * s2 * inv_n;
                    cc[c] = -ca[c] * s1 * inv_n - cb[c] * mean[c];
                }
                for (int64_t i = 0; i < g; ++i) {
                    const float *xr = ROW(x, i), *dr = ROW(dy, i);
                    float *out = ROW(dx, i);
                    for (int64_t c = 0; c < C; ++c)
                        grad_run(dr + c * S, xr + c * S, out + c * S, S, ca[c], cb[c], cc[c]);
                }
            }
        }
        free(acc);
    }
    return failed;
}

/* ---- entry points ------------------------------------------------------------------------------ */

/* Training forward. contiguous: 1 for the contiguous partition, 0 for the strided one.
   stats: [3, m, C] output (mean, invstd, biased variance per ghost and channel).
   weight / bias / running_* may be NULL. The running statistics, when given, get BatchNorm's update with the
   ghosts' average mean and their average unbiased variance (functional.py's rule).
   Returns 0, or 1 when out of memory. */
int litplug_gbn_forward(const float *x, const float *weight, const float *bias, float *y,
                        float *stats, float *running_mean, float *running_var, int64_t B,
                        int64_t C, int64_t S, int64_t m, int contiguous, double eps,
                        double momentum) {
    const int64_t g = B / m, mats = contiguous ? m : 1, N = C * S * (m / mats);
    float *means = stats, *invstds = stats + m * C, *vars = stats + 2 * m * C;
    if (S == 1)
        forward_columns(x, weight, bias, y, means, invstds, vars, mats, g, N, C, (float)eps);
    else if (S < SHORT_CHANNEL) {
        if (forward_short_channels(x, weight, bias, y, means, invstds, vars, mats, g, N, C, S,
                                   (float)eps))
            return 1;
    } else if (forward_ghosts(x, weight, bias, y, means, invstds, vars, C, S, m, g, contiguous,
                              (float)eps))
        return 1;
    if (running_mean && running_var) {
        const double n = (double)(g * S), unbias = n / (n - 1.0);
        double *sums = calloc(2 * C, sizeof(double));
        if (!sums) return 1;
        for (int64_t k = 0; k < m; ++k)  /* ghost-major: both arrays are read in order */
            for (int64_t c = 0; c < C; ++c) {
                sums[c] += means[k * C + c];
                sums[C + c] += vars[k * C + c];
            }
        for (int64_t c = 0; c < C; ++c) {
            running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * sums[c] / m);
            running_var[c] =
                (float)((1.0 - momentum) * running_var[c] + momentum * sums[C + c] / m * unbias);
        }
        free(sums);
    }
    return 0;
}

/* Backward of litplug_gbn_forward: stats from the forward, sums [2, m, C] scratch.
   dweight / dbias may be NULL.
   Returns 0, or 1 when out of memory. */
int litplug_gbn_backward(const float *dy, const float *x, const float *weight, const float *stats,
                         float *dx, float *dweight, float *dbias, float *sums, int64_t B,
                         int64_t C, int64_t S, int64_t m, int contiguous) {
    const int64_t g = B / m, mats = contiguous ? m : 1, N = C * S * (m / mats);
    const float *means = stats, *invstds = stats + m * C;
    float *sum_dy = sums, *sum_dy_xhat = sums + m * C;
    if (S == 1)
        backward_columns(dy, x, weight, means, invstds, dx, sum_dy, sum_dy_xhat, mats, g, N, C);
    else if (S < SHORT_CHANNEL) {
        if (backward_short_channels(dy, x, weight, means, invstds, dx, sum_dy, sum_dy_xhat, mats,
                                    g, N, C, S))
            return 1;
    } else if (backward_ghosts(dy, x, weight, means, invstds, dx, sum_dy, sum_dy_xhat, C, S, m, g,
                               contiguous))
        return 1;
    float *dw = sum_dy_xhat, *db = sum_dy;  /* ghost 0's rows collect the sums over ghosts */
    for (int64_t k = 1; k < m; ++k)
        for (int64_t c = 0; c < C; ++c) {
            dw[c] += sum_dy_xhat[k * C + c];
            db[c] += sum_dy[k * C + c];
        }
    for (int64_t c = 0; c < C; ++c) {
        if (dweight) dweight[c] = dw[c];
        if (dbias) dbias[c] = db[c];
    }
    return 0;
}
