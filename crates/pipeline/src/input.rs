//! Conversion inputs: a Hugging Face checkpoint or a GGUF file.

use std::path::{Path, PathBuf};

use kiln_reader::split::SplitGguf;
use kiln_reader::Checkpoint;

/// Where tensors come from.
#[derive(Debug)]
pub(crate) enum Input {
    /// A safetensors checkpoint (names and transforms from the model family).
    Hf(Checkpoint),
    /// A GGUF file or split set (requantization; names kept).
    Gguf(SplitGguf),
}

impl Input {
    /// The bytes of source tensor `entry`.
    pub(crate) fn data(&self, entry: usize) -> &[u8] {
        match self {
            Input::Hf(c) => c.data(&c.tensors()[entry]),
            Input::Gguf(g) => g.tensor_data(entry),
        }
    }

    /// Releases the pages of bytes `start..end` of a tensor.
    pub(crate) fn release_range(&self, entry: usize, start: usize, end: usize) {
        match self {
            Input::Hf(c) => c.release_range(&c.tensors()[entry], start, end),
            Input::Gguf(g) => {
                if let Some(t) = g.tensors().get(entry) {
                    g.shards()[t.shard].release_range(t.index, start, end);
                }
            }
        }
    }

    /// The file a tensor lives in.
    pub(crate) fn tensor_path(&self, entry: usize) -> &Path {
        match self {
            Input::Hf(c) => c.tensor_path(&c.tensors()[entry]),
            Input::Gguf(g) => g
                .tensors()
                .get(entry)
                .map_or_else(|| g.paths()[0].as_path(), |t| g.paths()[t.shard].as_path()),
        }
    }

    /// The input files (to refuse writing over one of them).
    pub(crate) fn files(&self) -> Vec<&Path> {
        match self {
            Input::Hf(c) => c.shard_paths().collect(),
            Input::Gguf(g) => g.paths().iter().map(PathBuf::as_path).collect(),
        }
    }
}
