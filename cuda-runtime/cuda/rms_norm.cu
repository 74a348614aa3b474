// RMSNorm of each `dim`-wide row (ops::rms_norm): out = w * (x * (1 / sqrt(mean(x^2) + eps))).
// One block per row; `out` may be `x` (in place). Grid: rows.
extern "C" __global__ void __launch_bounds__(BLOCK) rms_norm(const float* x, const float* __restrict__ w, float* out,
                                                             int dim, float eps) {
    __shared__ float scratch[WARPS];
    const i64 base = (i64)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += BLOCK) {
        const float v = x[base + i];
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += BLOCK) out[base + i] = w[i] * (x[base + i] * inv);
}
