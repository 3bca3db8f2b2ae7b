/* Fused CPU kernels for the work an inversion step does around the network.
 *
 * On a small network the pyramid composition, the pixel priors and the Adam update cost about a
 * tenth of the network's own forward + backward when written as a dozen torch operations each
 * (every one a separate pass over the image plus dispatch). Here each is one or two passes.
 *
 * All arrays are contiguous float32; images are planes of H x W (batch x channels of them).
 * invviz/engine/_native.py compiles this file on first use and checks every kernel against the
 * torch formulation in tests/test_native.py.
 */
#include <math.h>
#include <stddef.h>

/* 2x bilinear upsampling (align_corners = false) of one h x w plane to H x W, H in {2h - 1, 2h}:
 * output row 2i blends source rows i (3/4) and i - 1 (1/4), row 2i + 1 rows i and i + 1, indices
 * clamped at the borders; the same along columns. */
static void source_rows(int Y, int h, int *near, int *far)
{
    int i = Y >> 1;
    *near = i;
    if (Y & 1)
        *far = i + 1 < h ? i + 1 : h - 1;
    else
        *far = i > 0 ? i - 1 : 0;
}

/* Upsamples one row along columns: out[2j] = 3/4 row[j] + 1/4 row[j - 1], out[2j + 1] =
 * 3/4 row[j] + 1/4 row[j + 1] (clamped at the ends), for W outputs (2w - 1 or 2w). */
static void upsample_row(const float *row, int w, float *out, int W)
{
    out[0] = row[0];
    for (int j = 0; j + 1 < w; ++j) {
        out[2 * j + 1] = 0.75f * row[j] + 0.25f * row[j + 1];
        out[2 * j + 2] = 0.75f * row[j + 1] + 0.25f * row[j];
    }
    if (W == 2 * w)
        out[W - 1] = row[w - 1];
}

/* out = fine + up(coarse), one plane; with clamp != 0 the sum is clamped to [0, 1] and the part
 * cut off is moved into fine (so fine + up(coarse) equals the returned image exactly).
 * `row` is scratch for w + W floats. */
static void upsample_add_plane(const float *coarse, int h, int w, float *fine, float *out, int H, int W,
                               float *row, int clamp)
{
    float *wide = row + w;
    for (int Y = 0; Y < H; ++Y) {
        int near, far;
        source_rows(Y, h, &near, &far);
        const float *a = coarse + (size_t)near * w, *b = coarse + (size_t)far * w;
        for (int j = 0; j < w; ++j)
            row[j] = 0.75f * a[j] + 0.25f * b[j];
        upsample_row(row, w, wide, W);
        float *f = fine + (size_t)Y * W, *o = out + (size_t)Y * W;
        if (clamp) {
            for (int X = 0; X < W; ++X) {
                float value = f[X] + wide[X];
                float clamped = value < 0.0f ? 0.0f : value;
                clamped = clamped > 1.0f ? 1.0f : clamped;
                f[X] += clamped - value;
                o[X] = clamped;
            }
        } else {
            for (int X = 0; X < W; ++X)
                o[X] = f[X] + wide[X];
        }
    }
}

/* One composition step for `planes` planes: out = fine + up(coarse) (see upsample_add_plane). */
void invviz_upsample_add(const float *coarse, int h, int w, float *fine, float *out, int H, int W, int planes,
                         float *row, int clamp)
{
    for (int p = 0; p < planes; ++p)
        upsample_add_plane(coarse + (size_t)p * h * w, h, w, fine + (size_t)p * H * W, out + (size_t)p * H * W,
                           H, W, row, clamp);
}

/* Clamp to [0, 1], moving the excess into `fine` (the pyramid with one level). */
void invviz_clamp_into(float *fine, float *out, size_t count)
{
    for (size_t i = 0; i < count; ++i) {
        float value = fine[i];
        float clamped = value < 0.0f ? 0.0f : (value > 1.0f ? 1.0f : value);
        fine[i] = clamped;
        out[i] = clamped;
    }
}

/* Adjoint of upsample_row: coarse[j] collects what out[2j - 1 .. 2j + 2] took from row[j]. */
static void upsample_row_adjoint(const float *out, int W, float *row, int w)
{
    if (w == 1) {
        row[0] = out[0] + (W == 2 ? out[1] : 0.0f);
        return;
    }
    row[0] = out[0] + 0.75f * out[1] + 0.25f * out[2];
    for (int j = 1; j + 1 < w; ++j)
        row[j] = 0.25f * out[2 * j - 1] + 0.75f * out[2 * j] + 0.75f * out[2 * j + 1] + 0.25f * out[2 * j + 2];
    int j = w - 1;
    row[j] = 0.25f * out[2 * j - 1] + 0.75f * out[2 * j] + (W == 2 * w ? out[W - 1] : 0.0f);
}

/* Adjoint of invviz_upsample_add's upsampling: coarse (h x w) = up^T(grad (H x W)), per plane.
 * `row` is scratch for w floats. */
void invviz_upsample_adjoint(const float *grad, int H, int W, float *coarse, int h, int w, int planes, float *row)
{
    for (int p = 0; p < planes; ++p) {
        const float *g = grad + (size_t)p * H * W;
        float *c = coarse + (size_t)p * h * w;
        for (size_t i = 0; i < (size_t)h * w; ++i)
            c[i] = 0.0f;
        for (int Y = 0; Y < H; ++Y) {
            upsample_row_adjoint(g + (size_t)Y * W, W, row, w);
            int near, far;
            source_rows(Y, h, &near, &far);
            float *a = c + (size_t)near * w, *b = c + (size_t)far * w;
            for (int j = 0; j < w; ++j)
                a[j] += 0.75f * row[j];
            for (int j = 0; j < w; ++j)
                b[j] += 0.25f * row[j];
        }
    }
}

/* TV with beta = 2 on one plane in one sweep: s^(beta/2) = s is a sum over planes, so each plane
 * adds its own sum of dx^2 + dy^2, and its gradient is k times a Laplacian-like stencil (with the
 * terms of corners that exist). Returns the plane's sum over corners. */
static double quadratic_tv_plane(const float *p, float *g, int H, int W, float k)
{
    int rows = H - 1, cols = W - 1;
    double sum = 0.0;
    for (int i = 0; i < H; ++i) {
        const float *r = p + (size_t)i * W;
        float *o = g + (size_t)i * W;
        if (i < rows) {
            double acc = 0.0;
#pragma omp simd reduction(+ : acc)
            for (int j = 0; j < cols; ++j) {
                float dx = r[j + 1] - r[j], dy = r[j + W] - r[j];
                acc += (double)(dx * dx + dy * dy);
            }
            sum += acc;
        }
        if (i > 0 && i < rows) {
            /* Interior row: every corner exists except the one right of the last column. */
            o[0] += k * ((r[0] - r[1]) + (r[0] - r[W]) + (r[0] - r[-W]));
            for (int j = 1; j < cols; ++j)
                o[j] += k * (4.0f * r[j] - r[j + 1] - r[j - 1] - r[j + W] - r[j - W]);
            o[cols] += k * (r[cols] - r[cols - 1]);
            continue;
        }
        if (i < rows) { /* first row: no corners above */
            for (int j = 0; j < cols; ++j)
                o[j] -= k * ((r[j + 1] - r[j]) + (r[j + W] - r[j]));
            for (int j = 1; j <= cols; ++j)
                o[j] += k * (r[j] - r[j - 1]);
        }
        if (i > 0) { /* last row: only the corners above */
            for (int j = 0; j < cols; ++j)
                o[j] += k * (r[j] - r[j - W]);
        }
    }
    return sum;
}

/* Total variation of one image of C planes: value = mean over corners (i < H-1, j < W-1) of
 * s^(beta/2), s = sum over planes of dx^2 + dy^2 (+ epsilon when beta != 2); `weight` times its
 * gradient is added to grad. `slope` is scratch for (H-1) x (W-1) floats. Returns the value. */
static double total_variation(const float *x, float *grad, int C, int H, int W, double beta, double epsilon,
                              double weight, float *slope)
{
    size_t plane = (size_t)H * W, corners = (size_t)(H - 1) * (W - 1);
    int rows = H - 1, cols = W - 1;
    if (beta == 2.0) {
        double sum = 0.0;
        float k = (float)(2.0 * weight / (double)corners);
        for (int c = 0; c < C; ++c)
            sum += quadratic_tv_plane(x + c * plane, grad + c * plane, H, W, k);
        return sum / (double)corners;
    }
    for (size_t k = 0; k < corners; ++k)
        slope[k] = 0.0f;
    for (int c = 0; c < C; ++c)
        for (int i = 0; i < rows; ++i) {
            const float *r = x + c * plane + (size_t)i * W;
            float *s = slope + (size_t)i * cols;
            for (int j = 0; j < cols; ++j) {
                float dx = r[j + 1] - r[j], dy = r[j + W] - r[j];
                s[j] += dx * dx + dy * dy;
            }
        }
    /* From s to the value and, per corner, the gradient factor (beta/2) s^(beta/2 - 1) times
     * 2 weight / corners (the 2 from d(dx^2)/d(dx)). */
    double sum = 0.0;
    float scale = (float)(2.0 * weight / (double)corners), half = (float)(beta / 2.0), eps = (float)epsilon;
    if (beta == 1.0) {
#pragma omp simd reduction(+ : sum)
        for (size_t k = 0; k < corners; ++k) {
            float s = slope[k] + eps, powered = sqrtf(s);
            sum += powered;
            slope[k] = scale * 0.5f * powered / s;
        }
    } else {
        for (size_t k = 0; k < corners; ++k) {
            float s = slope[k] + eps, powered = powf(s, half);
            sum += powered;
            slope[k] = scale * half * powered / s;
        }
    }
    /* Each pixel's gradient: -k (dx + dy) of the corner at it, +k dx of the corner to its left,
     * +k dy of the corner above it (where those corners exist). */
    for (int c = 0; c < C; ++c)
        for (int i = 0; i < H; ++i) {
            const float *r = x + c * plane + (size_t)i * W;
            float *o = grad + c * plane + (size_t)i * W;
            const float *k = slope + (size_t)i * cols;
            if (i < rows) {
                for (int j = 0; j < cols; ++j)
                    o[j] -= k[j] * ((r[j + 1] - r[j]) + (r[j + W] - r[j]));
                for (int j = 1; j <= cols; ++j)
                    o[j] += k[j - 1] * (r[j] - r[j - 1]);
            }
            if (i > 0) {
                const float *above = k - cols;
                for (int j = 0; j < cols; ++j)
                    o[j] += above[j] * (r[j] - r[j - W]);
            }
        }
    return sum / (double)corners;
}

/* Alpha-norm of one image of C planes: value = mean over pixels of (sum_c (x_c - mean_c)^2)^(alpha/2);
 * `weight` times its gradient is added to grad. Row by row, so that each row of every plane is
 * read from memory once; `slope` is scratch for W floats. Returns the value. */
static double alpha_norm(const float *x, float *grad, int C, int H, int W, double alpha, const float *mean,
                         double weight, float *slope)
{
    size_t plane = (size_t)H * W;
    double sum = 0.0;
    /* Per pixel: alpha s^(alpha/2 - 1) times weight / pixels (d/dc of s^(alpha/2) is that times c). */
    float scale = (float)(weight * alpha / (double)plane), half = (float)(alpha / 2.0);
    for (int i = 0; i < H; ++i) {
        size_t offset = (size_t)i * W;
        for (int j = 0; j < W; ++j)
            slope[j] = 1e-12f;
        for (int c = 0; c < C; ++c) {
            const float *p = x + c * plane + offset;
            float centre = mean[c];
            for (int j = 0; j < W; ++j) {
                float d = p[j] - centre;
                slope[j] += d * d;
            }
        }
        double acc = 0.0;
        if (alpha == 6.0) {
#pragma omp simd reduction(+ : acc)
            for (int j = 0; j < W; ++j) {
                float s = slope[j], squared = s * s;
                acc += squared * s;
                slope[j] = scale * squared;
            }
        } else if (alpha == 2.0) {
#pragma omp simd reduction(+ : acc)
            for (int j = 0; j < W; ++j) {
                acc += slope[j];
                slope[j] = scale;
            }
        } else {
            for (int j = 0; j < W; ++j) {
                float s = slope[j], powered = powf(s, half);
                acc += powered;
                slope[j] = scale * powered / s;
            }
        }
        sum += acc;
        for (int c = 0; c < C; ++c) {
            const float *p = x + c * plane + offset;
            float *g = grad + c * plane + offset, centre = mean[c];
            for (int j = 0; j < W; ++j)
                g[j] += slope[j] * (p[j] - centre);
        }
    }
    return sum / (double)plane;
}

/* Both pixel priors for a batch (B, C, H, W): values (unweighted, unnormalized by the caller's
 * scales) go to tv_out[b] and alpha_out[b]; weight times each gradient is added to grad.
 * A zero weight skips that prior (its value is left at 0). */
void invviz_priors(const float *x, float *grad, int B, int C, int H, int W, double tv_weight, double beta,
                   double epsilon, double alpha_weight, double alpha, const float *mean, float *slope,
                   double *tv_out, double *alpha_out)
{
    size_t image = (size_t)C * H * W;
    for (int b = 0; b < B; ++b) {
        tv_out[b] = tv_weight != 0.0 && H > 1 && W > 1
                        ? total_variation(x + b * image, grad + b * image, C, H, W, beta, epsilon, tv_weight, slope)
                        : 0.0;
        alpha_out[b] = alpha_weight != 0.0
                           ? alpha_norm(x + b * image, grad + b * image, C, H, W, alpha, mean, alpha_weight, slope)
                           : 0.0;
    }
}

/* One Adam step (torch.optim.Adam's update, no weight decay) over `count` parameters. */
void invviz_adam(float *param, const float *grad, float *first, float *second, size_t count, double lr,
                 double beta1, double beta2, double epsilon, int step)
{
    double correction1 = 1.0 - pow(beta1, step), correction2 = 1.0 - pow(beta2, step);
    float size = (float)(lr / correction1), root = (float)sqrt(correction2), eps = (float)epsilon;
    float keep = (float)(1.0 - beta1), b2 = (float)beta2, keep2 = (float)(1.0 - beta2);
#pragma omp simd
    for (size_t i = 0; i < count; ++i) {
        float g = grad[i];
        float m = first[i] + keep * (g - first[i]);
        float v = b2 * second[i] + keep2 * g * g;
        first[i] = m;
        second[i] = v;
        param[i] -= size * m / (sqrtf(v) / root + eps);
    }
}
