// Per row of logits: the log-sum-exp (ops::log_sum_exp: max in f32, sum of exp(x - max) in f64)
// and the negative log-likelihood of the row's target, nll = lse - logits[target] (f64).
//   logits: f32 [rows, vocab]; targets: i32 [rows] (< 0: no target, nll = NaN; the host checks
//   targets < vocab); lse, nll: f64 [rows].
// One block per row. Grid: rows.
extern "C" __global__ void __launch_bounds__(BLOCK) log_softmax_nll(const float* __restrict__ logits,
                                                                    const int* __restrict__ targets,
                                                                    double* __restrict__ lse,
                                                                    double* __restrict__ nll, int vocab) {
    __shared__ float fs[WARPS];
    __shared__ double ds[WARPS];
    const i64 row = blockIdx.x;
    const float* l = logits + row * vocab;
    const double z = block_log_sum_exp(l, vocab, fs, ds);
    if (threadIdx.x == 0) {
        lse[row] = z;
        const int tgt = targets[row];
        nll[row] = (tgt >= 0 && tgt < vocab) ? z - (double)l[tgt] : D_NAN;
    }
}
