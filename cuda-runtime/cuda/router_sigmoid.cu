// Sigmoid, group-limited top-k routing with a correction bias (DeepSeek-V3 `noaux_tc`; the CPU
// runtime's `Moe::route`, Scoring::Sigmoid):
//   score  = 1 / (1 + exp(-logit));  choice = score + bias
//   groups of experts/groups experts: a group's score is the sum of its two best choices; the
//   topk_group best groups are kept (ties to the lower group), the others' choices set to -inf
//   idx    = the k best choices, best first, ties to the lower expert
//   wts    = score[idx]; divided by (their sum + 1e-20) when renorm != 0; times `scaling`
// logits: f32 [tokens, experts]; bias: f32 [experts]; idx: i32 [tokens, k]; wts: f32 [tokens, k].
// The host checks: groups divides experts, 2 <= experts/groups when groups > 1,
// 1 <= topk_group <= groups, k <= topk_group * experts/groups.
// One warp per token; dynamic shared memory: WARPS*(2*experts + groups) floats.
// Grid: ceil(tokens / WARPS).
extern "C" __global__ void __launch_bounds__(BLOCK) router_sigmoid(const float* __restrict__ logits,
                                                                   const float* __restrict__ bias,
                                                                   int* __restrict__ idx, float* __restrict__ wts,
                                                                   int tokens, int experts, int k, int groups,
                                                                   int topk_group, int renorm, float scaling) {
    extern __shared__ float sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 t = (i64)blockIdx.x * WARPS + warp;
    if (t >= tokens) return;
    float* score = sm + warp * (2 * experts + groups);
    float* choice = score + experts;
    float* gscore = choice + experts;
    const float* l = logits + t * experts;
    for (int e = lane; e < experts; e += 32) {
        score[e] = 1.0f / (1.0f + expf(-l[e]));
        choice[e] = score[e] + bias[e];
    }
    __syncwarp();
    if (groups > 1) {
        const int per = experts / groups;
        for (int g = lane; g < groups; g += 32) {
            const float* c = choice + g * per;
            int a = -1, b = -1;
            for (int e = 0; e < per; ++e) {
                if (ranks_before(c[e], e, a < 0 ? 0.0f : c[a], a)) {
                    b = a;
                    a = e;
                } else if (ranks_before(c[e], e, b < 0 ? 0.0f : c[b], b)) {
                    b = e;
                }
            }
            gscore[g] = c[a] + c[b];
        }
        __syncwarp();
        // Keep the topk_group best groups: mark each kept group's score NaN, then mask the rest.
        for (int j = 0; j < topk_group; ++j) {
            float bv = 0.0f;
            int bi = -1;
            for (int g = lane; g < groups; g += 32)
                if (ranks_before(gscore[g], g, bv, bi)) {
                    bv = gscore[g];
                    bi = g;
                }
            warp_argmax(bv, bi);
            if (lane == 0) gscore[bi] = F_NAN;
            __syncwarp();
        }
        for (int e = lane; e < experts; e += 32) {
            const float gs = gscore[e / per];
            if (gs == gs) choice[e] = -F_INF;  // not kept
        }
        __syncwarp();
    }
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
        float bv = 0.0f;
        int bi = -1;
        for (int e = lane; e < experts; e += 32)
            if (ranks_before(choice[e], e, bv, bi)) {
                bv = choice[e];
                bi = e;
            }
        warp_argmax(bv, bi);
        if (lane == 0) {
            idx[t * k + j] = bi;
            wts[t * k + j] = score[bi];
            sum += score[bi];
            choice[bi] = F_NAN;  // taken
        }
        __syncwarp();
    }
    if (lane == 0) {
        sum += 1e-20f;
        for (int j = 0; j < k; ++j) {
            float w = wts[t * k + j];
            if (renorm) w = w / sum;
            wts[t * k + j] = w * scaling;
        }
    }
}
