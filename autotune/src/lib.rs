//! FP8 block-scaled GEMM tile autotuning per GPU: the GPU spec table ([`gpu`]), the GEMM shapes
//! of a model ([`shapes`]), the analytic cost model that ranks the legal search space of the
//! kernels ([`model`]), and the per-GPU YAML tables with lookup and merging ([`table`]).
//! Measuring on a GPU builds on the kernels' benchmark harness (in progress).

pub mod gpu;
pub mod model;
pub mod shapes;
pub mod table;
