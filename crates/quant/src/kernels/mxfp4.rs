//! MXFP4: E2M1 values with a shared E8M0 exponent.

use super::Kernel;

pub(crate) const KERNELS: &[Kernel] = &[];
