//! One module per subcommand; each is a thin layer over the library crates.

pub mod bench;
pub mod demo;
pub mod export;
pub mod ingest;
pub mod plan;
pub mod profile;
pub mod sample;
pub mod shards;
pub mod study;
pub mod tokenizer;
pub mod train;
