//! Split GGUF inputs (`-00001-of-0000N.gguf` sets). (Being implemented.)
