//! `motley bench fetch --remote URI`: one large object (a shard or checkpoint file) fetched
//! from an object store with its ranges one after another (the baseline: how motley fetched
//! before `range_streams`) and with several in flight at once; bytes checked against the
//! uploaded ones.

use std::time::Instant;

use anyhow::ensure;
use serde::Serialize;

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(after_help = "Example, against a local S3 emulator behind scripts/bench/latency_proxy.py:\n  motley bench \
                  fetch --remote s3://bench/fetch --mb 128 --streams 8")]
pub struct Args {
    /// Where the object goes (`s3://bucket/prefix`, `gs://…`, `az://…`, `file://…`).
    #[arg(long)]
    remote: String,
    /// Object size in MiB.
    #[arg(long, default_value_t = 128)]
    mb: u64,
    /// Range reads in flight at once in the measured run (the baseline has one).
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Bytes per range read, MiB (motley's default: 16).
    #[arg(long, default_value_t = 16)]
    range_mb: u64,
    /// Fetches per setting; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

#[derive(Debug, Serialize)]
struct Timing {
    streams: usize,
    seconds: f64,
    mb_per_s: f64,
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    ensure!(args.mb > 0 && args.streams > 0 && args.range_mb > 0, "--mb, --streams and --range-mb must be positive");
    let uri = format!("{}/bench-fetch-{}mb.bin", args.remote.trim_end_matches('/'), args.mb);
    let size = args.mb << 20;
    // Pseudo-random bytes (blake3's extendable output): nothing on the way can compress them.
    let mut data = vec![0u8; size as usize];
    blake3::Hasher::new().update(b"motley bench fetch").finalize_xof().fill(&mut data);
    let want = blake3::hash(&data);
    motley_remote::put_object(&uri, data, &ctx.remote)?;
    let work = tempfile::tempdir()?;
    let measure = |streams: usize| -> anyhow::Result<Timing> {
        let mut opts = ctx.remote.clone();
        opts.range_streams = streams;
        opts.range_bytes = args.range_mb << 20;
        let mut best = f64::INFINITY;
        for i in 0..args.repeat.max(1) {
            let dest = work.path().join(format!("s{streams}-{i}.bin"));
            let t0 = Instant::now();
            motley_remote::fetch_input(&uri, size, &dest, &opts)?;
            best = best.min(t0.elapsed().as_secs_f64());
            let got = blake3::hash(&std::fs::read(&dest)?);
            ensure!(got == want, "{uri}: fetched bytes differ from the uploaded ones ({streams} streams)");
            std::fs::remove_file(&dest)?;
        }
        Ok(Timing { streams, seconds: best, mb_per_s: size as f64 / 1e6 / best })
    };
    let one = measure(1)?;
    let many = measure(args.streams)?;
    let ratio = one.seconds / many.seconds;
    motley_remote::delete_object(&uri, &ctx.remote)?;
    if ctx.json {
        return output::json(&serde_json::json!({
            "object": uri,
            "bytes": size,
            "range_bytes": args.range_mb << 20,
            "one_stream": one,
            "streams": many,
            "ratio_streams_vs_one": ratio,
            "same_bytes": true,
        }));
    }
    output::line(format!("{uri}: {} MiB in ranges of {} MiB, best of {}", args.mb, args.range_mb, args.repeat))?;
    for t in [&one, &many] {
        output::line(format!("{:>3} stream(s): {:.3} s = {:.1} MB/s", t.streams, t.seconds, t.mb_per_s))?;
    }
    output::line(format!("{} streams: {ratio:.2}x one (bytes checked)", args.streams))
}
