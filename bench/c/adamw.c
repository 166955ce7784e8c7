// The roofline for the AdamW benchmark: a hand-written fused AdamW step in C (one pass over
// param, grad, m, v; OpenMP threads), compiled with -O3 -march=native -fno-math-errno
// (so that sqrtf vectorizes) by build.rs.
#include <math.h>
#include <stddef.h>

void adamw_c(float *restrict p, const float *restrict g, float *restrict m, float *restrict v, size_t n,
             float lr, float b1, float b2, float eps, float wd, int step) {
    const float c1 = 1.0f - powf(b1, (float)step), c2 = 1.0f - powf(b2, (float)step);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float mi = b1 * m[i] + (1.0f - b1) * g[i];
        float vi = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] - lr * ((mi / c1) / (sqrtf(vi / c2) + eps) + wd * p[i]);
    }
}
