/* Fused CPU kernels for the work an inversion step does around the network.
 *
 * On a small network the pyramid composition, the pixel priors and the Adam update cost about a
 * tenth of the network's own forward + backward when written as a dozen torch operations each
 * (every one a separate pass over the image plus dispatch). Here each is one or two passes.
 *
 * All arrays are contiguous float32; images are planes of H x W (batch x channels of them).
 * invviz/engine/_native.py compiles this file on first use and checks every kernel against the
 * torch formulation in tests/test_native.py.
 *
 * Threads: every kernel takes `threads` and splits its rows (or elements) over that many OpenMP
 * threads when built with -fopenmp; the Python side passes torch's thread count only where this
 * library shares torch's OpenMP runtime (so the threads are torch's own pool), 1 otherwise.
 * Every output element is computed by one thread in the same order whatever the split, and sums
 * are taken per row and added up serially, so results do not depend on the thread count.
 */
#include <math.h>
#include <stddef.h>

/* Below this many elements a parallel region costs more than it saves. */
#define PARALLEL_MIN 16384

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

/* One output row Y of out = fine + up(coarse) for one plane; with clamp != 0 the sum is clamped
 * to [0, 1] and the part cut off is moved into fine (so fine + up(coarse) equals the returned
 * image exactly). `row` is scratch for w + W floats. */
static void upsample_add_row(const float *coarse, int h, int w, float *fine, float *out, int Y, int W, float *row,
                             int clamp)
{
    float *wide = row + w;
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

/* One composition step for `planes` planes: out = fine + up(coarse) (see upsample_add_row). */
void invviz_upsample_add(const float *coarse, int h, int w, float *fine, float *out, int H, int W, int planes,
                         int clamp, int threads)
{
    long rows = (long)planes * H;
#pragma omp parallel for num_threads(threads) if (threads > 1 && rows * W >= PARALLEL_MIN) schedule(static)
    for (long r = 0; r < rows; ++r) {
        long p = r / H;
        float row[w + W];
        upsample_add_row(coarse + (size_t)p * h * w, h, w, fine + (size_t)p * H * W, out + (size_t)p * H * W,
                         (int)(r % H), W, row, clamp);
    }
}

/* Clamp to [0, 1], moving the excess into `fine` (the pyramid with one level). */
void invviz_clamp_into(float *fine, float *out, size_t count, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && count >= PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; ++i) {
        float value = fine[i];
        float clamped = value > 0.0f ? value : 0.0f; /* one select per line: see below */
        clamped = clamped < 1.0f ? clamped : 1.0f;
        fine[i] = clamped;
        out[i] = clamped;
    }
}

/* The gradient through a ReLU6 whose corners are rounded off `width` (0 < width <= 3) on either
 * side (representations/_surrogates.py, smoothed_relu6_weight): grad times min(pre + width,
 * 6 + width - pre) / (2 width), clamped to [0, 1]. Element by element, so any layout both tensors
 * share; `out` may be `grad` itself. */
void invviz_smoothed_relu6_backward(const float *grad, const float *pre, float *out, size_t count, double width_,
                                    int threads)
{
    const float width = (float)width_, scale = (float)(0.5 / width_);
    /* One select per line, so that the compiler makes each a min or max instruction and the loop
     * vectorizes: nested selects compiled to a compare and a branch per element, which
     * mispredicted on real activations (5-10 times slower than torch's ReLU6 backward on this
     * project's AMD EPYC machine; the engine's step went 1.6-1.8 times a bare pass). */
#pragma omp parallel for simd num_threads(threads) if (threads > 1 && count >= PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; ++i) {
        float x = pre[i];
        float nearer = x < 6.0f - x ? x : 6.0f - x;
        float ramp = (nearer + width) * scale;
        ramp = ramp > 0.0f ? ramp : 0.0f;
        ramp = ramp < 1.0f ? ramp : 1.0f;
        out[i] = grad[i] * ramp;
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

/* Coarse row r (of planes x h) of up^T: the sum of the fine rows whose source rows (source_rows)
 * include it, 3/4 as the near row and 1/4 as the far one, from `rows` (planes x H x w), each fine
 * row's column adjoint. */
static void gather_coarse_row(const float *rows, int H, float *coarse, int h, int w, long r)
{
    long p = r / h;
    int i = (int)(r % h);
    float *c = coarse + (size_t)r * w;
    for (int j = 0; j < w; ++j)
        c[j] = 0.0f;
    int first = 2 * i - 2 < 0 ? 0 : 2 * i - 2, last = 2 * i + 3 < H ? 2 * i + 3 : H;
    for (int Y = first; Y < last; ++Y) {
        int near, far;
        source_rows(Y, h, &near, &far);
        float weight = (near == i ? 0.75f : 0.0f) + (far == i ? 0.25f : 0.0f);
        if (weight == 0.0f)
            continue;
        const float *g = rows + ((size_t)p * H + Y) * w;
        for (int j = 0; j < w; ++j)
            c[j] += weight * g[j];
    }
}

/* Adjoint of invviz_upsample_add's upsampling: coarse (h x w) = up^T(grad (H x W)), per plane.
 * First each fine row's column adjoint goes to `rows` (planes x H x w scratch); then each coarse
 * row gathers them (gather_coarse_row). Both passes split over rows, each output written by one
 * thread. */
void invviz_upsample_adjoint(const float *grad, int H, int W, float *coarse, int h, int w, int planes, float *rows,
                             int threads)
{
    long fine_rows = (long)planes * H, coarse_rows = (long)planes * h;
#pragma omp parallel num_threads(threads) if (threads > 1 && fine_rows * W >= PARALLEL_MIN)
    {
#pragma omp for schedule(static)
        for (long r = 0; r < fine_rows; ++r)
            upsample_row_adjoint(grad + (size_t)r * W, W, rows + (size_t)r * w, w);
#pragma omp for schedule(static)
        for (long r = 0; r < coarse_rows; ++r)
            gather_coarse_row(rows, H, coarse, h, w, r);
    }
}

/* Adam's constants for one step (torch.optim.Adam's update, no weight decay). */
struct adam_step {
    float size, root, eps, keep, b2, keep2;
    /* With `basis` (3 x 3, row-major: basis[3 r + k] is colour r of axis k), Adam runs on the
     * coordinates p of three colour planes x = basis p: gradient basis^T g, step basis d. */
    const float *basis;
};

static struct adam_step adam_constants(double lr, double beta1, double beta2, double epsilon, int step)
{
    double correction1 = 1.0 - pow(beta1, step), correction2 = 1.0 - pow(beta2, step);
    struct adam_step a = {(float)(lr / correction1), (float)sqrt(correction2), (float)epsilon, (float)(1.0 - beta1),
                          (float)beta2, (float)(1.0 - beta2), NULL};
    return a;
}

/* Adam's update of `count` elements. */
static void adam_run(float *param, const float *grad, float *first, float *second, size_t count,
                     const struct adam_step *a)
{
    float size = a->size, root = a->root, eps = a->eps, keep = a->keep, b2 = a->b2, keep2 = a->keep2;
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

/* Adam's update of `count` pixels of three colour planes `plane` floats apart, in a->basis (see
 * struct adam_step): the moments are the basis coordinates'. */
static void adam_run_basis(float *param, const float *grad, float *first, float *second, size_t plane, size_t count,
                           const struct adam_step *a)
{
    float size = a->size, root = a->root, eps = a->eps, keep = a->keep, b2 = a->b2, keep2 = a->keep2;
    const float *M = a->basis;
    float *p0 = param, *p1 = param + plane, *p2 = param + 2 * plane;
    float *m0 = first, *m1 = first + plane, *m2 = first + 2 * plane;
    float *v0 = second, *v1 = second + plane, *v2 = second + 2 * plane;
    const float *g0 = grad, *g1 = grad + plane, *g2 = grad + 2 * plane;
#pragma omp simd
    for (size_t i = 0; i < count; ++i) {
        float r = g0[i], g = g1[i], b = g2[i];
        float q0 = M[0] * r + M[3] * g + M[6] * b;
        float q1 = M[1] * r + M[4] * g + M[7] * b;
        float q2 = M[2] * r + M[5] * g + M[8] * b;
        float n0 = m0[i] + keep * (q0 - m0[i]), n1 = m1[i] + keep * (q1 - m1[i]), n2 = m2[i] + keep * (q2 - m2[i]);
        float w0 = b2 * v0[i] + keep2 * q0 * q0, w1 = b2 * v1[i] + keep2 * q1 * q1, w2 = b2 * v2[i] + keep2 * q2 * q2;
        m0[i] = n0, m1[i] = n1, m2[i] = n2;
        v0[i] = w0, v1[i] = w1, v2[i] = w2;
        float d0 = size * n0 / (sqrtf(w0) / root + eps);
        float d1 = size * n1 / (sqrtf(w1) / root + eps);
        float d2 = size * n2 / (sqrtf(w2) / root + eps);
        p0[i] -= M[0] * d0 + M[1] * d1 + M[2] * d2;
        p1[i] -= M[3] * d0 + M[4] * d1 + M[5] * d2;
        p2[i] -= M[6] * d0 + M[7] * d1 + M[8] * d2;
    }
}

/* Adam's update of B images of C planes of `plane` floats (per channel, or in a->basis when
 * C == 3), split among `threads`. */
static void adam_images(float *param, const float *grad, float *first, float *second, int B, int C, size_t plane,
                        const struct adam_step *a, int threads)
{
    if (!a->basis || C != 3) {
        size_t count = (size_t)B * C * plane;
        long parts = threads > 1 && count >= PARALLEL_MIN ? threads : 1;
#pragma omp parallel for num_threads(threads) if (parts > 1) schedule(static)
        for (long part = 0; part < parts; ++part) {
            size_t begin = count * part / parts, end = count * (part + 1) / parts;
            adam_run(param + begin, grad + begin, first + begin, second + begin, end - begin, a);
        }
        return;
    }
    long per_image = threads > 1 && (size_t)B * 3 * plane >= PARALLEL_MIN ? threads : 1, parts = B * per_image;
#pragma omp parallel for num_threads(threads) if (per_image > 1) schedule(static)
    for (long part = 0; part < parts; ++part) {
        long b = part / per_image, k = part % per_image;
        size_t begin = plane * k / per_image, end = plane * (k + 1) / per_image, offset = (size_t)b * 3 * plane + begin;
        adam_run_basis(param + offset, grad + offset, first + offset, second + offset, plane, end - begin, a);
    }
}

/* What a step does to the finest level once a row of its gradient is final: the row's column
 * adjoint (toward the next level, when `rows` is given) and its Adam update (when `param` is). */
struct finish_rows {
    float *param, *first, *second, *rows;
    int w; /* the next level's width */
    struct adam_step adam;
};

static void finish_row(const struct finish_rows *f, const float *grad, size_t plane, int C, int H, int W, int i)
{
    int basis = f->adam.basis && C == 3;
    for (int c = 0; c < C; ++c) {
        size_t offset = c * plane + (size_t)i * W;
        if (f->rows)
            upsample_row_adjoint(grad + offset, W, f->rows + ((size_t)c * H + i) * f->w, f->w);
        if (f->param && !basis)
            adam_run(f->param + offset, grad + offset, f->first + offset, f->second + offset, (size_t)W, &f->adam);
    }
    if (f->param && basis) {
        size_t offset = (size_t)i * W;
        adam_run_basis(f->param + offset, grad + offset, f->first + offset, f->second + offset, plane, (size_t)W,
                       &f->adam);
    }
}

/* The network's input as the representation prepares it from the image (its InputLayout): pixel
 * (b, c, y, x) becomes scale[c] * pixel + shift[c] at data[b * stride[0] + c * stride[1] +
 * y * stride[2] + x * stride[3]] (`data` points past the padding, which is never written), and
 * the network's gradient with respect to that element is read the same way from `grad` with
 * `grad_stride`. At most 4 channels. */
struct prepared_input {
    float *data;
    const float *grad;
    long stride[4], grad_stride[4];
    float scale[4], shift[4];
};

/* Row y of image b (C planes of H x W) into the prepared input. */
static void prepare_row(const struct prepared_input *in, const float *image, int C, int H, int W, int b, int y)
{
    long sx = in->stride[3];
    for (int c = 0; c < C; ++c) {
        const float *src = image + ((size_t)(b * C + c) * H + y) * W;
        float *dst = in->data + b * in->stride[0] + c * in->stride[1] + y * in->stride[2];
        float scale = in->scale[c], shift = in->shift[c];
        for (int x = 0; x < W; ++x)
            dst[x * sx] = scale * src[x] + shift;
    }
}

/* Row y of image b's gradient (C planes, `plane` floats apart, rows of W) from the prepared
 * input's: d/d pixel = scale[c] * d/d prepared element. Overwrites the row. */
static void load_gradient_row(const struct prepared_input *in, float *grad, size_t plane, int C, int W, int b, int y)
{
    long sx = in->grad_stride[3];
    for (int c = 0; c < C; ++c) {
        const float *src = in->grad + b * in->grad_stride[0] + c * in->grad_stride[1] + y * in->grad_stride[2];
        float *dst = grad + c * plane + (size_t)y * W, scale = in->scale[c];
        for (int x = 0; x < W; ++x)
            dst[x] = scale * src[x * sx];
    }
}

/* The prepared input of B images (C planes of H x W each, contiguous) (see prepared_input). */
void invviz_prepare(const float *image, int B, int C, int H, int W, const struct prepared_input *in, int threads)
{
    long rows = (long)B * H;
#pragma omp parallel for num_threads(threads) if (threads > 1 && rows * C * W >= PARALLEL_MIN) schedule(static)
    for (long r = 0; r < rows; ++r)
        prepare_row(in, image, C, H, W, (int)(r / H), (int)(r % H));
}

/* Quadratic TV (beta = 2) on row i of one plane: s^(beta/2) = s is a sum over planes, so each
 * plane adds its own sum of dx^2 + dy^2 over the row's corners, and its gradient is k times a
 * Laplacian-like stencil (with the terms of corners that exist). Adds into `o`, row i of the
 * gradient; returns the row's sum over corners (0 for the last row, which has none). */
static double quadratic_tv_row(const float *p, float *o, int H, int W, float k, int i)
{
    int rows = H - 1, cols = W - 1;
    const float *r = p + (size_t)i * W;
    double acc = 0.0;
    if (i < rows) {
#pragma omp simd reduction(+ : acc)
        for (int j = 0; j < cols; ++j) {
            float dx = r[j + 1] - r[j], dy = r[j + W] - r[j];
            acc += (double)(dx * dx + dy * dy);
        }
    }
    if (i > 0 && i < rows) {
        /* Interior row: every corner exists except the one right of the last column. */
        o[0] += k * ((r[0] - r[1]) + (r[0] - r[W]) + (r[0] - r[-W]));
        for (int j = 1; j < cols; ++j)
            o[j] += k * (4.0f * r[j] - r[j + 1] - r[j - 1] - r[j + W] - r[j - W]);
        o[cols] += k * (r[cols] - r[cols - 1]);
        return acc;
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
    return acc;
}

/* Corner row i of TV with beta != 2: s = sum over planes of dx^2 + dy^2 (+ epsilon) per corner,
 * turned in place into the gradient factor (beta/2) s^(beta/2 - 1) times `scale`. Returns the
 * row's sum of s^(beta/2). */
static double tv_corner_row(const float *x, size_t plane, int C, int W, int i, double beta, float eps, float scale,
                            float *s)
{
    int cols = W - 1;
    for (int j = 0; j < cols; ++j)
        s[j] = 0.0f;
    for (int c = 0; c < C; ++c) {
        const float *r = x + c * plane + (size_t)i * W;
        for (int j = 0; j < cols; ++j) {
            float dx = r[j + 1] - r[j], dy = r[j + W] - r[j];
            s[j] += dx * dx + dy * dy;
        }
    }
    double sum = 0.0;
    float half = (float)(beta / 2.0);
    if (beta == 1.0) {
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < cols; ++j) {
            float v = s[j] + eps, powered = sqrtf(v);
            sum += powered;
            s[j] = scale * 0.5f * powered / v;
        }
    } else {
        for (int j = 0; j < cols; ++j) {
            float v = s[j] + eps, powered = powf(v, half);
            sum += powered;
            s[j] = scale * half * powered / v;
        }
    }
    return sum;
}

/* Gradient of TV with beta != 2 on row i of every plane, from the corner factors `slope`
 * ((H-1) x (W-1)): -k (dx + dy) of the corner at a pixel, +k dx of the corner to its left, +k dy
 * of the corner above it (where those corners exist). Adds into `out` + c `stride`, row i of
 * plane c's gradient. */
static void tv_gradient_row(const float *x, float *out, size_t stride, size_t plane, int C, int H, int W, int i,
                            const float *slope)
{
    int rows = H - 1, cols = W - 1;
    for (int c = 0; c < C; ++c) {
        const float *r = x + c * plane + (size_t)i * W;
        float *o = out + c * stride;
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
}

/* Alpha-norm on row i of one image of C planes: adds the row's share of `scale` times the gradient
 * of sum over pixels of (sum_c (x_c - mean_c)^2)^(alpha/2) to grad, reading each plane's row once;
 * `slope` is scratch for W floats. Returns the row's sum. */
static double alpha_norm_row(const float *x, float *grad, size_t plane, int C, int W, int i, double alpha,
                             const float *mean, float scale, float *slope)
{
    size_t offset = (size_t)i * W;
    float half = (float)(alpha / 2.0);
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
    /* Per pixel: alpha s^(alpha/2 - 1) times weight / pixels (d/dc of s^(alpha/2) is that times c). */
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
    for (int c = 0; c < C; ++c) {
        const float *p = x + c * plane + offset;
        float *g = grad + c * plane + offset, centre = mean[c];
        for (int j = 0; j < W; ++j)
            g[j] += slope[j] * (p[j] - centre);
    }
    return acc;
}

/* Row i of T x into `mixed`, T = the colour stretch of the TV prior: each pixel's mean over the
 * planes plus `stretch` times its difference from that mean (T is symmetric: its own adjoint). */
static void stretch_colour_row(const float *x, float *mixed, size_t plane, int C, int W, int i, float stretch)
{
    size_t offset = (size_t)i * W;
    float mean[W], share = (1.0f - stretch) / (float)C;
    for (int j = 0; j < W; ++j)
        mean[j] = 0.0f;
    for (int c = 0; c < C; ++c)
        for (int j = 0; j < W; ++j)
            mean[j] += x[c * plane + offset + j];
    /* mean + stretch (x - mean) = stretch x + (1 - stretch) mean */
    for (int c = 0; c < C; ++c) {
        const float *r = x + c * plane + offset;
        float *o = mixed + c * plane + offset;
        for (int j = 0; j < W; ++j)
            o[j] = stretch * r[j] + share * mean[j];
    }
}

/* Adds M `local` into row i of `grad`, M = a I - (b / C) 1 1^T acting on each pixel's C values
 * (`local`: C rows of W floats). T itself is a = stretch, b = stretch - 1; T^2 = I + chroma P is
 * a = 1 + chroma, b = chroma. */
static void add_colour_mixed_row(const float *local, float *grad, size_t plane, int C, int W, int i, float a,
                                 float b)
{
    size_t offset = (size_t)i * W;
    float total[W], share = b / (float)C;
    for (int j = 0; j < W; ++j)
        total[j] = 0.0f;
    for (int c = 0; c < C; ++c)
        for (int j = 0; j < W; ++j)
            total[j] += local[c * W + j];
    for (int c = 0; c < C; ++c) {
        const float *l = local + c * W;
        float *g = grad + c * plane + offset;
        for (int j = 0; j < W; ++j)
            g[j] += a * l[j] - share * total[j];
    }
}

/* Quadratic TV of T x on row i, without forming T x: TV(T x) sums d^T T^2 d over the corners'
 * differences d, = (1 + chroma) |d|^2 - (chroma / C) (sum_c d_c)^2, and its gradient is T^2 times
 * plain TV's, k times the stencil (quadratic_tv_row). Adds into row i of every plane of `grad`;
 * returns the row's value. */
static double colour_quadratic_tv_row(const float *x, float *grad, size_t plane, int C, int H, int W, float k,
                                      double chroma, int i)
{
    float local[C * W];
    for (int n = 0; n < C * W; ++n)
        local[n] = 0.0f;
    double plain = 0.0, brightness = 0.0;
    for (int c = 0; c < C; ++c)
        plain += quadratic_tv_row(x + c * plane, local + c * W, H, W, k, i);
    if (i < H - 1) {
        /* Sums over the planes of row i and row i + 1, then their differences. */
        float here[W], below[W];
        size_t offset = (size_t)i * W;
        for (int j = 0; j < W; ++j)
            here[j] = below[j] = 0.0f;
        for (int c = 0; c < C; ++c) {
            const float *r = x + c * plane + offset;
            for (int j = 0; j < W; ++j) {
                here[j] += r[j];
                below[j] += r[j + W];
            }
        }
#pragma omp simd reduction(+ : brightness)
        for (int j = 0; j < W - 1; ++j) {
            float dx = here[j + 1] - here[j], dy = below[j] - here[j];
            brightness += (double)(dx * dx + dy * dy);
        }
    }
    add_colour_mixed_row(local, grad, plane, C, W, i, (float)(1.0 + chroma), (float)chroma);
    return (1.0 + chroma) * plain - chroma / C * brightness;
}

/* Both pixel priors of one image (C, H, W) in one sweep over its rows (two with beta != 2, which
 * needs every corner's factor first): TV^beta = mean over corners (i < H-1, j < W-1) of
 * s^(beta/2), s = sum over planes of dx^2 + dy^2 (+ epsilon when beta != 2), and the alpha-norm =
 * mean over pixels of (sum_c (x_c - mean_c)^2)^(alpha/2); each weight times its gradient is added to
 * grad, a zero weight skips that prior (its value stays 0). With `chroma` != 0 (and C > 1), TV is
 * taken of T x (stretch_colour_row, stretch sqrt(1 + chroma)): for beta = 2 row by row
 * (colour_quadratic_tv_row), else T x is written to `mixed` (C H W floats) first and the gradient
 * carried back through T row by row. `slope` is scratch for
 * (H-1) x (W-1) floats, `sums` for 2 H doubles (per-row sums, added up serially). With `input`,
 * each row of grad is first loaded from the network's gradient of image b's prepared input
 * (load_gradient_row) instead of being given. With `finish`, each row of the gradient is passed
 * on (finish_row) as soon as it is final, while it is in cache. */
static void image_priors(const float *x, float *grad, int C, int H, int W, double tv_weight, double beta,
                         double chroma, double epsilon, double alpha_weight, double alpha, const float *mean,
                         float *slope, float *mixed, double *sums, double *tv_out, double *alpha_out,
                         const struct finish_rows *finish, const struct prepared_input *input, int b, int threads)
{
    size_t plane = (size_t)H * W, corners = (size_t)(H - 1) * (W - 1);
    int tv = tv_weight != 0.0 && H > 1 && W > 1, quadratic = beta == 2.0, norm = alpha_weight != 0.0;
    int stretched = tv && chroma != 0.0 && C > 1;
    float stretch = stretched ? (float)sqrt(1.0 + chroma) : 1.0f;
    int mixing = stretched && !quadratic; /* TV of T x formed in `mixed` */
    const float *source = mixing ? mixed : x;
    /* The 2 in the TV factor is d(dx^2)/d(dx). */
    float tv_scale = tv ? (float)(2.0 * tv_weight / (double)corners) : 0.0f;
    float alpha_scale = (float)(alpha_weight * alpha / (double)plane);
    double *tv_rows = sums, *alpha_rows = sums + H;
#pragma omp parallel num_threads(threads) if (threads > 1 && (long)C * H * W >= PARALLEL_MIN)
    {
        if (mixing) {
#pragma omp for schedule(static)
            for (int i = 0; i < H; ++i)
                stretch_colour_row(x, mixed, plane, C, W, i, stretch);
        }
        if (tv && !quadratic) {
#pragma omp for schedule(static)
            for (int i = 0; i < H - 1; ++i)
                tv_rows[i] = tv_corner_row(source, plane, C, W, i, beta, (float)epsilon, tv_scale,
                                           slope + (size_t)i * (W - 1));
        }
#pragma omp for schedule(static)
        for (int i = 0; i < H; ++i) {
            if (input)
                load_gradient_row(input, grad, plane, C, W, b, i);
            if (tv && quadratic && stretched) {
                tv_rows[i] = colour_quadratic_tv_row(x, grad, plane, C, H, W, tv_scale, chroma, i);
            } else if (tv && quadratic) {
                double row = 0.0;
                for (int c = 0; c < C; ++c)
                    row += quadratic_tv_row(x + c * plane, grad + c * plane + (size_t)i * W, H, W, tv_scale, i);
                tv_rows[i] = row;
            } else if (tv && !mixing) {
                tv_gradient_row(x, grad + (size_t)i * W, plane, plane, C, H, W, i, slope);
            } else if (tv) {
                /* Through a row buffer that T then carries back (T is symmetric). */
                float local[C * W];
                for (int n = 0; n < C * W; ++n)
                    local[n] = 0.0f;
                tv_gradient_row(mixed, local, (size_t)W, plane, C, H, W, i, slope);
                add_colour_mixed_row(local, grad, plane, C, W, i, stretch, stretch - 1.0f);
            }
            if (norm) {
                float scratch[W];
                alpha_rows[i] = alpha_norm_row(x, grad, plane, C, W, i, alpha, mean, alpha_scale, scratch);
            }
            /* Row i of the gradient is final: nothing else writes it. */
            if (finish)
                finish_row(finish, grad, plane, C, H, W, i);
        }
    }
    double tv_sum = 0.0, alpha_sum = 0.0;
    for (int i = 0; i < H; ++i) {
        if (tv && (quadratic || i < H - 1))
            tv_sum += tv_rows[i];
        if (norm)
            alpha_sum += alpha_rows[i];
    }
    *tv_out = tv ? tv_sum / (double)corners : 0.0;
    *alpha_out = norm ? alpha_sum / (double)plane : 0.0;
}

/* Both pixel priors for a batch (B, C, H, W) (see image_priors): values (unweighted, unnormalized by
 * the caller's scales) go to tv_out[b] and alpha_out[b]; weight times each gradient is added to grad. */
void invviz_priors(const float *x, float *grad, int B, int C, int H, int W, double tv_weight, double beta,
                   double chroma, double epsilon, double alpha_weight, double alpha, const float *mean, float *slope,
                   float *mixed, double *sums, double *tv_out, double *alpha_out, int threads)
{
    size_t image = (size_t)C * H * W;
    for (int b = 0; b < B; ++b)
        image_priors(x + b * image, grad + b * image, C, H, W, tv_weight, beta, chroma, epsilon, alpha_weight, alpha,
                     mean, slope, mixed, sums, tv_out + b, alpha_out + b, NULL, NULL, 0, threads);
}

/* One Adam step (torch.optim.Adam's update, no weight decay) over `count` parameters. */
void invviz_adam(float *param, const float *grad, float *first, float *second, size_t count, double lr,
                 double beta1, double beta2, double epsilon, int step, int threads)
{
    struct adam_step a = adam_constants(lr, beta1, beta2, epsilon, step);
    adam_images(param, grad, first, second, 1, 1, count, &a, threads);
}

/* A pyramid's image (see loop.py's _Pyramid): out = params[0] + up(params[1] + up(... params[L-1])),
 * clamped to [0, 1] with the excess moved into params[0]. Level l is planes x heights[l] x
 * widths[l]; partial[l] (0 < l < L - 1) receives level l's composite (partial[0] is unused). */
void invviz_compose(int planes, int levels, float *const *params, const int *heights, const int *widths,
                    float *const *partial, float *out, int threads)
{
    if (levels == 1) {
        invviz_clamp_into(params[0], out, (size_t)planes * heights[0] * widths[0], threads);
        return;
    }
    const float *coarse = params[levels - 1];
    for (int l = levels - 2; l >= 0; --l) {
        float *dest = l == 0 ? out : partial[l];
        invviz_upsample_add(coarse, heights[l + 1], widths[l + 1], params[l], dest, heights[l], widths[l], planes,
                            l == 0, threads);
        coarse = dest;
    }
}

/* Everything a step does after the network, for a pyramid of B images of C planes: the pixel
 * priors of `image` (values to tv_out / alpha_out, weighted gradients added into grads[0], the
 * image's gradient; zero weights skip them), each coarser level's gradient (grads[l] = up^T of
 * grads[l - 1]) and one Adam step of every level with its moments; then, with `next` != NULL,
 * the next step's image composed into it (invviz_compose, `partial` its scratch) while the
 * levels are still in cache. With `input` (see prepared_input) the image's gradient is read from
 * the network's gradient of its prepared input (grads[0] is then scratch it is loaded into) and
 * the next image is also written into the prepared input. With `basis` (3 x 3, see struct
 * adam_step; NULL: each plane on its own) Adam runs on the coordinates of C == 3 planes in it.
 * Scratch: `slope` H x W floats, `mixed` C H W floats, `sums` 2 H doubles, `rows` B C H
 * ceil(W / 2) floats. */
void invviz_update(const float *image, int B, int C, int levels, float *const *params, float *const *grads,
                   float *const *firsts, float *const *seconds, const int *heights, const int *widths,
                   double tv_weight, double beta, double chroma, double epsilon, double alpha_weight, double alpha,
                   const float *mean, float *slope, float *mixed, double *sums, double *tv_out, double *alpha_out,
                   float *rows, double lr, double beta1, double beta2, double adam_epsilon, int step,
                   float *const *partial, float *next, const struct prepared_input *input, const float *basis,
                   int threads)
{
    int H = heights[0], W = widths[0];
    size_t image_size = (size_t)C * H * W;
    struct adam_step adam = adam_constants(lr, beta1, beta2, adam_epsilon, step);
    adam.basis = basis;
    /* The finest level in one sweep over its rows: priors, column adjoint toward level 1, Adam. */
    for (int b = 0; b < B; ++b) {
        size_t offset = b * image_size;
        struct finish_rows finish = {params[0] + offset, firsts[0] + offset, seconds[0] + offset,
                                     levels > 1 ? rows + (size_t)b * C * H * widths[1] : NULL,
                                     levels > 1 ? widths[1] : 0, adam};
        image_priors(image + offset, grads[0] + offset, C, H, W, tv_weight, beta, chroma, epsilon, alpha_weight, alpha,
                     mean, slope, mixed, sums, tv_out + b, alpha_out + b, &finish, input, b, threads);
    }
    if (levels > 1) {
        long coarse_rows = (long)B * C * heights[1];
#pragma omp parallel for num_threads(threads) if (threads > 1 && coarse_rows * widths[1] >= PARALLEL_MIN) \
    schedule(static)
        for (long r = 0; r < coarse_rows; ++r)
            gather_coarse_row(rows, H, grads[1], heights[1], widths[1], r);
    }
    for (int l = 2; l < levels; ++l)
        invviz_upsample_adjoint(grads[l - 1], heights[l - 1], widths[l - 1], grads[l], heights[l], widths[l], B * C,
                                rows, threads);
    for (int l = 1; l < levels; ++l)
        adam_images(params[l], grads[l], firsts[l], seconds[l], B, C, (size_t)heights[l] * widths[l], &adam, threads);
    if (next) {
        invviz_compose(B * C, levels, params, heights, widths, partial, next, threads);
        if (input)
            invviz_prepare(next, B, C, H, W, input, threads);
    }
}

/* Elements per partial sum of the data term: sums are over these fixed chunks, then added up
 * serially, so the value does not depend on the thread count. */
#define CHUNK 32768

/* The rectifier a code may end in (see representations._surrogates.RevivingClamp): with `rect` != NULL the code
 * is clamp(pre, rect->low, rect->high) of the given `pre`, and the gradient reaching a clamped
 * entry is passed to it times rect->revive when it points back inside, 0 otherwise. */
struct rectifier {
    float low, high, revive;
};

static inline float rectified(const struct rectifier *rect, float pre)
{
    float c = pre < rect->low ? rect->low : pre;
    return c > rect->high ? rect->high : c;
}

/* The data term (‖Φ − Φ0‖² / n)^(p/2) per image for B codes of N floats (target: one code shared
 * by all, `shared` != 0, or one per image), with n = norm[b] (one per image, or norm[0] shared
 * when `norms` == 1): value[b], and slope[b], the factor of (Φ − Φ0) in the value's gradient:
 * (p / n) (S/n)^(p/2 - 1), 0 where S/n is under `floor` (there the value is floor^(p/2); with p = 2
 * the plain S/n and 2 / n). With `rect` (see struct rectifier) `code` is the code before its
 * rectifier. `partial` is scratch for B ceil(N / CHUNK) doubles. */
void invviz_relative_error(const float *code, const float *target, int shared, int B, long N, const float *norm,
                           int norms, double power, double floor, const struct rectifier *rect, float *value,
                           float *slope, double *partial, int threads)
{
    long chunks = (N + CHUNK - 1) / CHUNK, total = (long)B * chunks;
#pragma omp parallel for num_threads(threads) if (threads > 1 && (long)B * N >= 4 * PARALLEL_MIN) schedule(static)
    for (long k = 0; k < total; ++k) {
        long b = k / chunks, begin = (k % chunks) * CHUNK, end = begin + CHUNK < N ? begin + CHUNK : N;
        const float *c = code + b * N, *t = target + (shared ? 0 : b * N);
        double acc = 0.0;
        if (rect) {
#pragma omp simd reduction(+ : acc)
            for (long i = begin; i < end; ++i) {
                float d = rectified(rect, c[i]) - t[i];
                acc += (double)(d * d);
            }
        } else {
#pragma omp simd reduction(+ : acc)
            for (long i = begin; i < end; ++i) {
                float d = c[i] - t[i];
                acc += (double)(d * d);
            }
        }
        partial[k] = acc;
    }
    for (int b = 0; b < B; ++b) {
        double sum = 0.0, n = norm[norms == 1 ? 0 : b];
        for (long k = 0; k < chunks; ++k)
            sum += partial[b * chunks + k];
        double relative = sum / n;
        if (power == 2.0) {
            value[b] = (float)relative;
            slope[b] = (float)(2.0 / n);
        } else {
            double floored = relative > floor ? relative : floor, powered = pow(floored, power / 2.0);
            value[b] = (float)powered;
            slope[b] = relative >= floor ? (float)(powered / floored * (power / n)) : 0.0f;
        }
    }
}

/* The data term's gradient: out = scale[b] (Φ − Φ0) for each image b (see invviz_relative_error);
 * with `rect`, the gradient with respect to the code before the rectifier. */
void invviz_relative_error_grad(const float *code, const float *target, int shared, int B, long N,
                                const float *scale, const struct rectifier *rect, float *out, int threads)
{
    long chunks = (N + CHUNK - 1) / CHUNK, total = (long)B * chunks;
#pragma omp parallel for num_threads(threads) if (threads > 1 && (long)B * N >= 4 * PARALLEL_MIN) schedule(static)
    for (long k = 0; k < total; ++k) {
        long b = k / chunks, begin = (k % chunks) * CHUNK, end = begin + CHUNK < N ? begin + CHUNK : N;
        const float *c = code + b * N, *t = target + (shared ? 0 : b * N);
        float *o = out + b * N, s = scale[b];
        if (rect) {
            float low = rect->low, high = rect->high, revive = rect->revive;
#pragma omp simd
            for (long i = begin; i < end; ++i) {
                float pre = c[i], g = s * (rectified(rect, pre) - t[i]);
                /* A descent step moves pre by -g: up where g < 0, down where g > 0. */
                float weight = pre > low && pre < high ? 1.0f
                               : (pre <= low && g < 0.0f) || (pre >= high && g > 0.0f) ? revive
                                                                                       : 0.0f;
                o[i] = g * weight;
            }
        } else {
#pragma omp simd
            for (long i = begin; i < end; ++i)
                o[i] = s * (c[i] - t[i]);
        }
    }
}
