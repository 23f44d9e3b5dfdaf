/* BayesAgg-MTL's regression step, compiled (pyromtl.infer.native builds and loads this file).
 *
 * pyromtl_spd_inverse: the batch posterior's covariance S = A⁻¹ of one SPD precision A shared by
 * K heads, by a Cholesky factor, and their means S b_k (eq. 2).
 *
 * pyromtl_regression_aggregate: the gradient moments of eq. 4 for K linear heads sharing S, and
 * their precision-weighted mean of eq. 7. The torch path (pyromtl.infer.bayesagg.
 * regression_moments, then aggregate) is the reference; this computes the same numbers per
 * sample b without building [K, B, d] tensors:
 *
 *   q = fᵀ r,  c_k = fᵀ m_k − y_k   (r = S f),
 *   μ_kj = 2 (c_k m_kj + r_j),
 *   v_kj = 4 r_j² + 8 c_k m_kj r_j + 4 q m_kj² + 4 (c_k² + q) S_jj,
 *   w_kj = exp(s (min_i log v_ij − log v_kj)),   g_j = Σ_k w_kj μ_kj / Σ_k w_kj.
 *
 * Built without -ffast-math (linked in, it would set flush-to-zero for the whole process); the
 * loops vectorise through libmvec's logf and expf, declared below.
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float expf(float);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* an AVX2 + FMA body and a baseline one, chosen when the library loads */
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* a [P, P] (row stride as) SPD; rhs [K, P] (row stride rs). Writes S = a⁻¹ [P, P] and
 * mean = rhs S [K, P], both contiguous. Returns 0, 1 when a is not positive definite in float32
 * (the caller then factorises with a jitter), or 2 when memory runs out. */
CLONES int pyromtl_spd_inverse(int64_t P, const float *a, int64_t as, int64_t K, const float *rhs, int64_t rs,
                               float *S, float *mean)
{
    float *L = malloc(sizeof(float) * (size_t)(2 * P * P));
    if (!L)
        return 2;
    float *X = L + P * P;
    /* a = L Lᵀ, row by row (each entry one dot product of two rows) */
    for (int64_t i = 0; i < P; ++i) {
        const float *li = L + i * P;
        for (int64_t j = 0; j <= i; ++j) {
            const float *lj = L + j * P;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t k = 0; k < j; ++k)
                dot += li[k] * lj[k];
            const float rest = a[i * as + j] - dot;
            if (i == j) {
                if (!(rest > 0.f)) { /* NaN fails too */
                    free(L);
                    return 1;
                }
                L[i * P + i] = __builtin_sqrtf(rest);
            } else {
                L[i * P + j] = rest / L[j * P + j];
            }
        }
    }
    /* X = L⁻¹ (lower), row by row: x_i = (e_i − Σ_{k<i} L_ik x_k) / L_ii */
    memset(X, 0, sizeof(float) * (size_t)(P * P));
    for (int64_t i = 0; i < P; ++i) {
        float *xi = X + i * P;
        xi[i] = 1.f;
        for (int64_t k = 0; k < i; ++k) {
            const float lik = L[i * P + k];
            const float *xk = X + k * P;
#pragma omp simd
            for (int64_t c = 0; c <= k; ++c)
                xi[c] -= lik * xk[c];
        }
        const float inv = 1.f / L[i * P + i];
#pragma omp simd
        for (int64_t c = 0; c <= i; ++c)
            xi[c] *= inv;
    }
    /* S = Xᵀ X, as a sum of the rows' outer products */
    memset(S, 0, sizeof(float) * (size_t)(P * P));
    for (int64_t i = 0; i < P; ++i) {
        const float *xi = X + i * P;
        for (int64_t r = 0; r <= i; ++r) {
            const float xr = xi[r];
            float *sr = S + r * P;
#pragma omp simd
            for (int64_t c = 0; c <= i; ++c)
                sr[c] += xr * xi[c];
        }
    }
    for (int64_t k = 0; k < K; ++k) {
        float *mk = mean + k * P;
        memset(mk, 0, sizeof(float) * (size_t)P);
        for (int64_t c = 0; c < P; ++c) {
            const float v = rhs[k * rs + c];
            const float *sc = S + c * P;
#pragma omp simd
            for (int64_t j = 0; j < P; ++j)
                mk[j] += v * sc[j];
        }
    }
    free(L);
    return 0;
}

/* features f [B, P] (rows of stride fs), r [B, P], means m [K, P], labels y [B, K] (any strides),
 * diag(S) [P] (stride ds); the first d ≤ P coordinates are aggregated into g [B, d] (row stride gs).
 * weight_sums [K] receives Σ_b Σ_j w_kj / Σ_i w_ij. Returns 0, or 1 when memory runs out. */
CLONES int pyromtl_regression_aggregate(int64_t B, int64_t K, int64_t P, int64_t d,
                                        const float *f, int64_t fs, const float *r, int64_t rs,
                                        const float *m, int64_t ms, const float *y, int64_t ybs, int64_t yks,
                                        const float *diag, int64_t ds, float s, float *g, int64_t gs,
                                        float *weight_sums)
{
    float *buf = malloc(sizeof(float) * (size_t)(3 * K * d + 4 * d + K));
    if (!buf)
        return 1;
    float *lv = buf, *mu = lv + K * d, *m2 = mu + K * d, *dg = m2 + K * d;
    float *low = dg + d, *num = low + d, *den = num + d, *c = den + d;
    for (int64_t j = 0; j < d; ++j)
        dg[j] = diag[j * ds];
    for (int64_t k = 0; k < K; ++k) {
        weight_sums[k] = 0.f;
        for (int64_t j = 0; j < d; ++j)
            m2[k * d + j] = m[k * ms + j] * m[k * ms + j];
    }
    for (int64_t b = 0; b < B; ++b) {
        const float *fb = f + b * fs, *rb = r + b * rs;
        float qb = 0.f;
#pragma omp simd reduction(+ : qb)
        for (int64_t p = 0; p < P; ++p)
            qb += fb[p] * rb[p];
        for (int64_t k = 0; k < K; ++k) {
            const float *mk = m + k * ms;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t p = 0; p < P; ++p)
                dot += fb[p] * mk[p];
            c[k] = dot - y[b * ybs + k * yks];
        }
        for (int64_t k = 0; k < K; ++k) {
            const float ck = c[k], scale = ck * ck + qb;
            const float *mk = m + k * ms, *mk2 = m2 + k * d;
            float *l = lv + k * d, *u = mu + k * d;
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) {
                const float cm = ck * mk[j], rj = rb[j];
                const float v = 4.f * (rj * rj + 2.f * cm * rj + qb * mk2[j] + scale * dg[j]);
                l[j] = logf(v < FLT_MIN ? FLT_MIN : v); /* the floor of aggregate(); NaN stays NaN */
                u[j] = 2.f * (cm + rj);
            }
        }
        for (int64_t j = 0; j < d; ++j) {
            low[j] = lv[j];
            num[j] = 0.f;
            den[j] = 0.f;
        }
        for (int64_t k = 1; k < K; ++k) {
            const float *l = lv + k * d;
#pragma omp simd
            for (int64_t j = 0; j < d; ++j)
                low[j] = l[j] < low[j] ? l[j] : low[j];
        }
        for (int64_t k = 0; k < K; ++k) {
            float *l = lv + k * d;
            const float *u = mu + k * d;
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) {
                const float w = expf(s * (low[j] - l[j])); /* ≤ 1, and 1 for the smallest variance */
                l[j] = w;
                num[j] += w * u[j];
                den[j] += w;
            }
        }
        float *gb = g + b * gs;
        for (int64_t j = 0; j < d; ++j)
            gb[j] = num[j] / den[j];
        for (int64_t k = 0; k < K; ++k) {
            const float *w = lv + k * d;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < d; ++j)
                sum += w[j] / den[j];
            weight_sums[k] += sum;
        }
    }
    free(buf);
    return 0;
}
