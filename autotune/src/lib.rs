//! FP8 block-scaled GEMM tile autotuning per GPU (issue 5; not yet implemented).
