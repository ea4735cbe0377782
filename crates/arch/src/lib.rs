//! Model families as data: tensor-name maps, transforms, config to GGUF metadata, tokenizer export.

#![deny(unsafe_code)]
#![deny(missing_docs)]
