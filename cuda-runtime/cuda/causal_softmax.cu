// The softmax step of causal attention when the scores come from batched products (cuBLAS):
// scores f32 [batch, t, t] row-major, in place. Row i of each matrix becomes
//   p_j = softmax(scale * s_j) over keys lo <= j <= i (lo = i + 1 - window_len, or 0 when
//   window_len is 0), and 0 for every other j, as ops::causal_attention leaves its score rows.
// One block per row. Grid: batch*t.
extern "C" __global__ void __launch_bounds__(BLOCK) causal_softmax(float* __restrict__ scores, int t, float scale,
                                                                   int window_len) {
    __shared__ float scratch[WARPS];
    const i64 row = blockIdx.x;
    const int i = (int)(row % t);
    const int lo = window_len > 0 ? max(0, i + 1 - window_len) : 0;
    float* s = scores + row * t;
    float m = -F_INF;
    for (int j = lo + threadIdx.x; j <= i; j += BLOCK) {
        s[j] = s[j] * scale;
        m = fmaxf(m, s[j]);
    }
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = lo + threadIdx.x; j <= i; j += BLOCK) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    sum = block_sum(sum, scratch);
    for (int j = threadIdx.x; j < t; j += BLOCK) s[j] = (j >= lo && j <= i) ? s[j] / sum : 0.0f;
}
