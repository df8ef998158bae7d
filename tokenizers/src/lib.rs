//! motley-tokenizers (being built).
