//! `motley sample` (not built yet).

use crate::output::{Ctx, not_built};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

pub fn run(_args: Args, _ctx: &Ctx) -> anyhow::Result<()> {
    not_built("sample")
}
