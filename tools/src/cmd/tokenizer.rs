//! `motley tokenizer ...` (not built yet).

use crate::output::{not_built, Ctx};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    #[command(external_subcommand)]
    Other(Vec<String>),
}

pub fn run(_cmd: Command, _ctx: &Ctx) -> anyhow::Result<()> {
    not_built("tokenizer")
}
