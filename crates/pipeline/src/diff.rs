//! Differences between two GGUF artifacts. (Being implemented.)
