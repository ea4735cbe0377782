//! Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32 with an f16 scale (and minimum).

use super::Kernel;

pub(crate) const KERNELS: &[Kernel] = &[];
