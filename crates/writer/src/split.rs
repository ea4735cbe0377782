//! Split GGUF output: shard planning, names and keys, as llama.cpp's gguf-split. (Being implemented.)
