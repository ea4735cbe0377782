//! IQ4_NL and IQ4_XS: 4-bit indices into a non-linear table.

use super::Kernel;

pub(crate) const KERNELS: &[Kernel] = &[];
