//! The k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256.

use super::Kernel;

pub(crate) const KERNELS: &[Kernel] = &[];
