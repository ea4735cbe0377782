//! Conversion inputs: a Hugging Face checkpoint or a GGUF file.

use std::path::Path;

use kiln_reader::{Checkpoint, GgufInput};

/// Where tensors come from.
#[derive(Debug)]
pub(crate) enum Input {
    /// A safetensors checkpoint (names and transforms from the model family).
    Hf(Checkpoint),
    /// A GGUF file (requantization; names kept).
    Gguf(GgufInput),
}

impl Input {
    /// The bytes of source tensor `entry`.
    pub(crate) fn data(&self, entry: usize) -> &[u8] {
        match self {
            Input::Hf(c) => c.data(&c.tensors()[entry]),
            Input::Gguf(g) => g.data(entry),
        }
    }

    /// Releases the pages of bytes `start..end` of a tensor.
    pub(crate) fn release_range(&self, entry: usize, start: usize, end: usize) {
        match self {
            Input::Hf(c) => c.release_range(&c.tensors()[entry], start, end),
            Input::Gguf(g) => g.release_range(entry, start, end),
        }
    }

    /// The file a tensor lives in.
    pub(crate) fn tensor_path(&self, entry: usize) -> &Path {
        match self {
            Input::Hf(c) => c.tensor_path(&c.tensors()[entry]),
            Input::Gguf(g) => g.path(),
        }
    }

    /// The input files (to refuse writing over one of them).
    pub(crate) fn files(&self) -> Vec<&Path> {
        match self {
            Input::Hf(c) => c.shard_paths().collect(),
            Input::Gguf(g) => vec![g.path()],
        }
    }
}
