//! Calibration statistics (importance matrices), kept as mergeable sums and counts.

#![deny(unsafe_code)]
#![deny(missing_docs)]
