//! The grid types sharing `iq2xs_init_impl`: IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M.

use super::Kernel;

pub(crate) const KERNELS: &[Kernel] = &[];
