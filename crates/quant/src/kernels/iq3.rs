//! The grid types sharing `iq3xs_init_impl`: IQ3_XXS and IQ3_S.

use super::Kernel;

pub(crate) const KERNELS: &[Kernel] = &[];
