// The most likely token of each row of logits: the index of the largest value, of equal values
// the lowest (as the CPU runtime's TopK and argmax). logits: f32 [rows, vocab]; out: i32 [rows].
// One block per row. Grid: rows.
extern "C" __global__ void __launch_bounds__(BLOCK) top1(const float* __restrict__ logits, int* __restrict__ out,
                                                         int vocab) {
    __shared__ float sv[WARPS];
    __shared__ int si[WARPS];
    const i64 row = blockIdx.x;
    const float* l = logits + row * vocab;
    float bv = 0.0f;
    int bi = -1;
    for (int j = threadIdx.x; j < vocab; j += BLOCK)
        if (ranks_before(l[j], j, bv, bi)) {
            bv = l[j];
            bi = j;
        }
    block_argmax(bv, bi, sv, si);
    if (threadIdx.x == 0) out[row] = bi;
}
