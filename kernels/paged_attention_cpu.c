/*
 * Paged decode attention for CPUs: one query token per sequence, keys and values read in place
 * from the paged cache (layout: pagedbackend/kernels/layout.py), one pass over each K/V tile.
 *
 * Why native code: in PyTorch the same computation needs a gather of every sequence's context
 * followed by batched matrix-vector products; both are memory-bound passes and the gather
 * writes a copy, so decode attention cost ~3x a single read of the cache. Here each
 * (sequence, KV head) is one task that streams its blocks once, serving all query heads of
 * the group (GQA) from the same tile.
 *
 * Built at first use by pagedbackend.kernels.cpu_native with the system C compiler and
 * OpenMP; the process shares the OpenMP runtime PyTorch already loaded.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 64

/* Blocks of a sequence sit at unrelated addresses, so the hardware prefetcher cannot follow
 * the block table: while a tile is processed, the same row of the next block's tile is
 * requested. */
static inline void prefetch_row(const float *row, int64_t head_dim) {
    for (int64_t d = 0; d < head_dim; d += 16) __builtin_prefetch(row + d, 0, 3);
}

/* exp(x) for the softmax's x <= 0, written so the compiler vectorizes it (libm's expf is a
 * scalar call): x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split), exp(r) by the Cephes
 * polynomial, 2^n through the exponent bits. Relative error ~1e-7 over the range used. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale_bits;
    scale_bits.i = ((int32_t)n + 127) << 23;
    return p * scale_bits.f;
}

/* tanh(x) for the soft-cap, written so that GCC vectorizes its loop (libm's tanhf is a scalar
 * call; checked with -fopt-info-vec): for |x| < 0.625 the Cephes tanhf polynomial, else
 * (1 - e) / (1 + e) with e = exp(-2|x|), where 1 - e does not cancel. exp as in exp_nonpositive
 * but without floorf or a float-to-int conversion: without -fno-trapping-math GCC 12 vectorizes
 * neither (a conversion "could trap" in the branch it sinks the large-|x| path into), so n is
 * rounded by the 1.5 * 2^23 trick and read back from the bits. Relative error <= 1.5e-7 over
 * [-100, 100], as libm's tanhf; saturates to +-1; NaN stays NaN. */
static inline float tanh_vec(float x) {
    const float a = fabsf(x);
    const float z = x * x;
    const float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
                          + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
    float y = -2.f * a;
    y = y < -87.0f ? -87.0f : y;
    /* n = round(y log2 e): adding 1.5 * 2^23 rounds to an integer, which m's low bits then hold */
    const float m = y * 1.44269504088896341f + 12582912.f;
    const float n = m - 12582912.f;
    int32_t m_bits;
    memcpy(&m_bits, &m, sizeof m_bits);
    const float r = y - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (m_bits - 0x4B400000 + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    const float e = p * two_n;
    const float large = copysignf((1.f - e) / (1.f + e), x);
    return x != x ? x : (a < 0.625f ? small : large);
}

/* Block b of a sequence in one cache, for one KV head: its tile (block_size x head_dim), the
 * next block's tile to prefetch, and the rows [lo, hi) of it that hold positions in [first, len). */
typedef struct {
    const float *tile, *next;
    int64_t lo, hi;
} block_span;

static inline block_span span_of_block(const float *cache, const int32_t *table, int64_t b, int64_t first,
                                       int64_t len, int64_t block_size, int64_t num_kv_heads, int64_t kvh,
                                       int64_t head_dim) {
    block_span sp;
    sp.tile = cache + ((int64_t)table[b] * num_kv_heads + kvh) * block_size * head_dim;
    sp.next = (b + 1) * block_size < len
        ? cache + ((int64_t)table[b + 1] * num_kv_heads + kvh) * block_size * head_dim : sp.tile;
    sp.lo = b * block_size < first ? first - b * block_size : 0;
    sp.hi = (b + 1) * block_size > len ? len - b * block_size : block_size;
    return sp;
}

/* out: [num_seqs, num_heads, head_dim] contiguous; q: same shape, rows q_stride_seq and heads
 * q_stride_head floats apart (head_dim contiguous); caches: [num_blocks, num_kv_heads, block_size,
 * head_dim] contiguous; block_tables: [num_seqs, bt_stride] int32; seq_lens: [num_seqs] int32.
 * sliding_window <= 0 means none; a query at position L-1 sees keys in [L - window, L).
 * soft_cap > 0 soft-caps the scaled scores before the softmax, as Gemma 2's attention does:
 * s = soft_cap * tanh(s / soft_cap); 0 or negative means none. */
int paged_decode_attention_f32(float *out, const float *q, int64_t q_stride_seq, int64_t q_stride_head,
                               const float *k_cache, const float *v_cache,
                               const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens,
                               int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t block_size, float scale, float soft_cap, int64_t sliding_window,
                               int64_t max_seq_len) {
    const int64_t group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || group * num_kv_heads != num_heads) return -1;
    int failed = 0;

#pragma omp parallel
    {
        /* Scores of one task: group x max_seq_len, reused across the thread's tasks. */
        float *scores = (float *)malloc(sizeof(float) * (size_t)group * (size_t)(max_seq_len > 0 ? max_seq_len : 1));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t s = 0; s < num_seqs; s++) {
            for (int64_t kvh = 0; kvh < num_kv_heads; kvh++) {
                if (scores == NULL) continue;
                const int64_t len = seq_lens[s];
                const int64_t first = (sliding_window > 0 && len > sliding_window) ? len - sliding_window : 0;
                const int64_t n = len - first;
                const int32_t *table = block_tables + s * bt_stride;
                const float *qs = q + s * q_stride_seq + kvh * group * q_stride_head;
                /* q . k for every visible position, block by block: a block's rows for this
                 * head are one contiguous block_size x head_dim tile. */
                for (int64_t b = first / block_size; b * block_size < len; b++) {
                    const block_span sp = span_of_block(k_cache, table, b, first, len, block_size, num_kv_heads, kvh,
                                                        head_dim);
                    for (int64_t t = sp.lo; t < sp.hi; t++) {
                        prefetch_row(sp.next + t * head_dim, head_dim);
                        const float *krow = sp.tile + t * head_dim;
                        float *srow = scores + (b * block_size + t - first);
                        for (int64_t g = 0; g < group; g++) {
                            const float *qg = qs + g * q_stride_head;
                            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                            for (int64_t d = 0; d < head_dim; d++) acc += qg[d] * krow[d];
                            srow[g * n] = acc * scale;
                        }
                    }
                }
                float inv_sum[MAX_GROUP];
                for (int64_t g = 0; g < group; g++) {
                    float *sg = scores + g * n;
                    if (soft_cap > 0.f) {  /* (s / cap), tanh, * cap: the order transformers' eager Gemma 2 uses */
#pragma omp simd
                        for (int64_t i = 0; i < n; i++) sg[i] = tanh_vec(sg[i] / soft_cap) * soft_cap;
                    }
                    float mx = sg[0];
#pragma omp simd reduction(max : mx)
                    for (int64_t i = 1; i < n; i++) mx = sg[i] > mx ? sg[i] : mx;
                    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
                    for (int64_t i = 0; i < n; i++) {
                        sg[i] = exp_nonpositive(sg[i] - mx);
                        sum += sg[i];
                    }
                    inv_sum[g] = 1.f / sum;
                }
                /* out = softmax . V, streaming each value tile once for the whole group. */
                float acc_out[MAX_GROUP * 256];
                float *os = out + (s * num_heads + kvh * group) * head_dim;
                float *acc = head_dim <= 256 ? acc_out : os;
                for (int64_t i = 0; i < group * head_dim; i++) acc[i] = 0.f;
                for (int64_t b = first / block_size; b * block_size < len; b++) {
                    const block_span sp = span_of_block(v_cache, table, b, first, len, block_size, num_kv_heads, kvh,
                                                        head_dim);
                    for (int64_t t = sp.lo; t < sp.hi; t++) {
                        prefetch_row(sp.next + t * head_dim, head_dim);
                        const float *vrow = sp.tile + t * head_dim;
                        const int64_t i = b * block_size + t - first;
                        for (int64_t g = 0; g < group; g++) {
                            const float p = scores[g * n + i];
                            float *ag = acc + g * head_dim;
#pragma omp simd
                            for (int64_t d = 0; d < head_dim; d++) ag[d] += p * vrow[d];
                        }
                    }
                }
                for (int64_t g = 0; g < group; g++)
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; d++) os[g * head_dim + d] = acc[g * head_dim + d] * inv_sum[g];
            }
        }
        free(scores);
    }
    return failed ? -2 : 0;
}
