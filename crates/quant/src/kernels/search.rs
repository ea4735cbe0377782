//! Shared search helpers of `ggml-quants.c` (`make_qx_quants`, `make_qkx2_quants`,
//! `make_qkx3_quants`, `make_qp_quants`, ...), bit-exact: plain f32 operations in the same order,
//! no fused multiply-add.
