// Softmax top-k routing (Mixtral, Qwen3-MoE; the CPU runtime's `Moe::route`, Scoring::Softmax):
//   probs = softmax(logits) (max, exp(v - max), sum, divide, in f32)
//   idx   = the k largest probs, largest first, ties to the lower expert
//   wts   = probs[idx], divided by their sum (summed in selection order) when renorm != 0
// logits: f32 [tokens, experts]; idx: i32 [tokens, k]; wts: f32 [tokens, k].
// One warp per token; dynamic shared memory: WARPS*experts floats. Grid: ceil(tokens / WARPS).
extern "C" __global__ void __launch_bounds__(BLOCK) router_softmax(const float* __restrict__ logits,
                                                                   int* __restrict__ idx, float* __restrict__ wts,
                                                                   int tokens, int experts, int k, int renorm) {
    extern __shared__ float sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 t = (i64)blockIdx.x * WARPS + warp;
    if (t >= tokens) return;  // whole warps leave; no block-wide barrier below
    float* p = sm + warp * experts;
    const float* l = logits + t * experts;
    float m = -F_INF;
    for (int e = lane; e < experts; e += 32) m = fmaxf(m, l[e]);
    m = warp_max(m);
    float s = 0.0f;
    for (int e = lane; e < experts; e += 32) {
        p[e] = expf(l[e] - m);
        s += p[e];
    }
    s = warp_sum(s);
    for (int e = lane; e < experts; e += 32) p[e] = p[e] / s;
    __syncwarp();
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
        float bv = 0.0f;
        int bi = -1;
        for (int e = lane; e < experts; e += 32)
            if (ranks_before(p[e], e, bv, bi)) {
                bv = p[e];
                bi = e;
            }
        warp_argmax(bv, bi);
        if (lane == 0) {
            idx[t * k + j] = bi;
            wts[t * k + j] = bv;
            sum += bv;
            p[bi] = F_NAN;  // taken: NaN never ranks first
        }
        __syncwarp();
    }
    if (renorm && lane == 0)
        for (int j = 0; j < k; ++j) wts[t * k + j] = wts[t * k + j] / sum;
}
