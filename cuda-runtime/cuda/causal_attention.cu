// Causal attention, all heads of `windows` windows of t tokens (ops::causal_attention), one
// simple kernel: no tensor cores, the scores of one (query, head) row in shared memory.
//   q: f32 [windows*t, heads, dq]; k: [windows*t, kv_heads, dq]; v: [windows*t, kv_heads, dv];
//   out: [windows*t, heads, dv]. Query head h reads key/value head h / (heads / kv_heads).
//   Query i attends to keys j <= i of its window with i - j < window_len (window_len 0: all).
//   p = softmax(scale * q.k) (max, exp(s - max), sum, divide, in f32); out = sum_j p_j v_j.
// One block per (token, head); dynamic shared memory: (t + dq) floats. Grid: windows*t*heads.
extern "C" __global__ void __launch_bounds__(BLOCK) causal_attention(const float* __restrict__ q,
                                                                     const float* __restrict__ k,
                                                                     const float* __restrict__ v,
                                                                     float* __restrict__ out, int t, int heads,
                                                                     int kv_heads, int dq, int dv, float scale,
                                                                     int window_len) {
    extern __shared__ float sm[];
    float* sc = sm;      // [t]
    float* qs = sm + t;  // [dq]
    __shared__ float scratch[WARPS];
    const int h = blockIdx.x % heads;
    const i64 row = blockIdx.x / heads;  // window * t + i
    const int i = (int)(row % t);
    const i64 w0 = row - i;  // first row of the window
    const int kh = h / (heads / kv_heads);
    const int lo = window_len > 0 ? max(0, i + 1 - window_len) : 0;
    for (int d = threadIdx.x; d < dq; d += BLOCK) qs[d] = q[(row * heads + h) * dq + d];
    __syncthreads();
    float m = -F_INF;
    for (int j = lo + threadIdx.x; j <= i; j += BLOCK) {
        const float* kr = k + ((w0 + j) * kv_heads + kh) * (i64)dq;
        float s = 0.0f;
        for (int d = 0; d < dq; ++d) s = fmaf(qs[d], kr[d], s);
        s *= scale;
        sc[j] = s;
        m = fmaxf(m, s);
    }
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = lo + threadIdx.x; j <= i; j += BLOCK) {
        const float e = expf(sc[j] - m);
        sc[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    for (int j = lo + threadIdx.x; j <= i; j += BLOCK) sc[j] = sc[j] / sum;
    __syncthreads();
    for (int d = threadIdx.x; d < dv; d += BLOCK) {
        float acc = 0.0f;
        for (int j = lo; j <= i; ++j) acc = fmaf(sc[j], v[((w0 + j) * kv_heads + kh) * (i64)dv + d], acc);
        out[(row * heads + h) * dv + d] = acc;
    }
}
