//! TQ1_0 and TQ2_0: ternary types.

use super::Kernel;

pub(crate) const KERNELS: &[Kernel] = &[];
