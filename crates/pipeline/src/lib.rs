//! Runs a validated kiln plan: reads, transforms, quantizes and writes tensors, and returns a report.

#![deny(unsafe_code)]
#![deny(missing_docs)]
