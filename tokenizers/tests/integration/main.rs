//! motley-tokenizers' integration tests as one binary, a module per area: eight binaries each
//! linked and optimized the candle / image / HF tokenizers code they share again (about a
//! minute of CI's two cores; docs/BENCHMARKS.md, "CI build").

mod common;

mod bad_input;
mod decoder_mutations;
mod image;
mod load_any;
mod pretrained_mimi;
mod pretrained_vae;
mod pretrained_vq;
mod speech;
mod text_parity;
