//! `motley bench ingest` (not built yet).

use crate::output::{not_built, Ctx};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

pub fn run(_args: Args, _ctx: &Ctx) -> anyhow::Result<()> {
    not_built("bench ingest")
}
