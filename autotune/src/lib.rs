//! FP8 block-scaled GEMM tile autotuning per GPU (issue 5, in progress): the GPU spec table and
//! the GEMM shapes of a model so far; the cost model, measuring and tables come next.

pub mod gpu;
pub mod shapes;
