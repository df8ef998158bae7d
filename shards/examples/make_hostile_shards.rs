//! Rewrites the hostile corpora under shards/tests/hostile/ (see generate.rs there).
//! Usage: cargo run -p motley-shards --example make_hostile_shards -- shards/tests/hostile

#[path = "../tests/hostile/generate.rs"]
mod generate;

fn main() -> std::io::Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "shards/tests/hostile".into());
    generate::write_all(std::path::Path::new(&out))
}
