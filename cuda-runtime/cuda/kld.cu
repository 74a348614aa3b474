// KL(P || Q) per row, P the baseline's distribution and Q the model's (the CPU runtime's
// `compare_position`): sum_i exp(lp_i) * (lp_i - lq_i) in f64, lp = base - lse_base,
// lq = model - lse_model, clamped at 0 (a negative value is rounding).
//   base, model: f32 [rows, vocab]; lse_base, lse_model: f64 [rows] (from log_softmax_nll);
//   kld: f64 [rows]. One block per row. Grid: rows.
extern "C" __global__ void __launch_bounds__(BLOCK) kld(const float* __restrict__ base,
                                                        const float* __restrict__ model,
                                                        const double* __restrict__ lse_base,
                                                        const double* __restrict__ lse_model,
                                                        double* __restrict__ out, int vocab) {
    __shared__ double ds[WARPS];
    const i64 row = blockIdx.x;
    const float* p = base + row * vocab;
    const float* q = model + row * vocab;
    const double zp = lse_base[row], zq = lse_model[row];
    double kl = 0.0;
    for (int j = threadIdx.x; j < vocab; j += BLOCK) {
        const double lp = (double)p[j] - zp;
        const double lq = (double)q[j] - zq;
        kl += exp(lp) * (lp - lq);
    }
    kl = block_sum_f64(kl, ds);
    if (threadIdx.x == 0) out[row] = kl > 0.0 ? kl : 0.0;
}
