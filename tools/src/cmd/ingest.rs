//! `motley ingest`: build a shard corpus from a TOML recipe or, for simple cases, from files
//! and globs given on the command line.

use std::path::PathBuf;

use anyhow::Context;
use motley_ingest::{ImageMode, IngestConfig, Part, Recipe, SourceKind, SourceSpec, Summary};

use crate::output::{self, Ctx};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Text,
    Image,
    Speech,
    Interleaved,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ImageModeArg {
    Vq,
    Latent,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  motley ingest --config data/sample/recipe.toml --tokenizers runs/demo/tokenizers --out runs/demo/corpus\n  motley ingest 'books/*.txt' --tokenizers tok --out corpus\n  motley ingest train.parquet --text-column content --tokenizers tok --out corpus --part 0/4\n  motley ingest 'laion/*.tar' --kind image --tokenizers tok --out corpus   # WebDataset: 000123.jpg + 000123.txt"
)]
pub struct Args {
    /// Input files, directories or globs (one source of --kind), local or in an object store
    /// (s3://, gs://, az://, https://; fetched per task into <cache-dir>/inputs); or use --config.
    inputs: Vec<String>,
    /// TOML recipe combining sources and tokenizers (paths relative to the recipe).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Directory holding text.json, image/ and speech/ (as `motley tokenizer` writes them) or a
    /// corpus's own tokenizers/ folder (text.json, image.safetensors, speech.safetensors);
    /// overrides the recipe's paths.
    #[arg(long)]
    tokenizers: Option<PathBuf>,
    /// Output corpus directory, or an object-store location (s3://, gs://, az://): the corpus
    /// is built in a local staging folder, each task's shards uploaded (and deleted there) as
    /// the task finishes, the manifest last.
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Chunk compression of the shards (default: raw on disk, zstd for an object-store --out).
    #[arg(long, value_enum)]
    compression: Option<CompressionArg>,
    /// Kind of the command-line inputs.
    #[arg(long, value_enum, default_value = "text")]
    kind: KindArg,
    /// JSONL key of the text / caption / transcript (in WebDataset tars: its member's
    /// extension, default txt).
    #[arg(long)]
    text_key: Option<String>,
    /// Parquet column of the text / caption / transcript.
    #[arg(long)]
    text_column: Option<String>,
    /// JSONL key / Parquet column of the image (in WebDataset tars: its member's extension,
    /// default the first image format).
    #[arg(long)]
    image_key: Option<String>,
    /// JSONL key / Parquet column of the audio (in WebDataset tars: its member's extension).
    #[arg(long)]
    audio_key: Option<String>,
    /// Probability that the caption/transcript precedes the image/speech.
    #[arg(long)]
    text_first: Option<f64>,
    /// Store images as VQ codes or latent patches (default: what the image tokenizer is).
    #[arg(long, value_enum)]
    image_mode: Option<ImageModeArg>,
    /// Drop exact duplicate records (content hash), keeping the first.
    #[arg(long)]
    dedup: bool,
    /// Objects of an object-store input each task fetches ahead of the one it reads, in
    /// parallel (0: one at a time, when the task reaches it).
    #[arg(long, default_value_t = 8)]
    fetch_ahead: usize,
    /// Worker threads (default: all cores; at most 4,096).
    #[arg(long)]
    workers: Option<usize>,
    /// Stop after N documents (dry runs).
    #[arg(long)]
    limit: Option<u64>,
    /// Ingest part i of N (0-based), e.g. 0/4; join the parts with `motley shards merge`.
    #[arg(long, default_value = "0/1")]
    part: Part,
    /// Stop when more than N records were skipped.
    #[arg(long)]
    max_errors: Option<u64>,
    /// Replace an existing corpus in --out.
    #[arg(long)]
    overwrite: bool,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
}

fn build_recipe(args: &Args) -> anyhow::Result<Recipe> {
    let mut recipe = match (&args.config, args.inputs.is_empty()) {
        (Some(_), false) => anyhow::bail!("give either --config or input paths, not both"),
        (None, true) => anyhow::bail!("nothing to ingest: give input paths or --config recipe.toml"),
        (Some(path), true) => Recipe::from_file(path)?,
        (None, false) => {
            let kind = match args.kind {
                KindArg::Text => SourceKind::Text,
                KindArg::Image => SourceKind::Image,
                KindArg::Speech => SourceKind::Speech,
                KindArg::Interleaved => SourceKind::Interleaved,
            };
            if args.text_key.is_some() && args.text_column.is_some() && args.text_key != args.text_column {
                anyhow::bail!("--text-key and --text-column name different fields; one source reads one field");
            }
            let spec = SourceSpec {
                text_field: args.text_key.clone().or_else(|| args.text_column.clone()),
                image_field: args.image_key.clone(),
                audio_field: args.audio_key.clone(),
                text_first: args.text_first,
                ..SourceSpec::new(kind, args.inputs.clone())
            };
            let recipe = Recipe { tokenizers: Default::default(), options: Default::default(), sources: vec![spec] };
            recipe.validate().map_err(anyhow::Error::msg)?;
            recipe
        }
    };
    if args.config.is_some()
        && (args.text_key.is_some()
            || args.text_column.is_some()
            || args.image_key.is_some()
            || args.audio_key.is_some()
            || args.text_first.is_some())
    {
        anyhow::bail!(
            "--text-key/--text-column/--image-key/--audio-key/--text-first apply to input paths; set them per source in the recipe"
        );
    }
    if let Some(dir) = &args.tokenizers {
        anyhow::ensure!(dir.is_dir(), "--tokenizers {}: not a directory", dir.display());
        recipe.locate_tokenizers(dir);
    }
    if let Some(m) = args.image_mode {
        recipe.options.image_mode = Some(match m {
            ImageModeArg::Vq => ImageMode::Vq,
            ImageModeArg::Latent => ImageMode::Latent,
        });
    }
    recipe.options.dedup |= args.dedup;
    Ok(recipe)
}

/// Shard chunk compression.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CompressionArg {
    Raw,
    Zstd,
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let mut recipe = build_recipe(&args)?;
    let remote = crate::remote::is_remote(&args.out).then(|| args.out.to_string_lossy().to_string());
    let out = match &remote {
        Some(uri) => crate::remote::staging_dir(uri, &ctx.remote),
        None => args.out.clone(),
    };
    recipe.options.compression = match (args.compression, &remote) {
        (Some(CompressionArg::Raw), _) => Some(motley_shards::Compression::Raw),
        (Some(CompressionArg::Zstd), _) => Some(motley_shards::Compression::Zstd),
        // Object stores: smaller transfers, and the block shuffle reads zstd at raw's pace.
        (None, Some(_)) => Some(motley_shards::Compression::Zstd),
        (None, None) => recipe.options.compression,
    };
    let cfg = IngestConfig {
        recipe,
        out: out.clone(),
        workers: args.workers,
        limit: args.limit,
        part: args.part,
        max_errors: args.max_errors,
        overwrite: args.overwrite,
        progress: !args.no_progress,
        upload: remote.clone(),
        fetch_ahead: args.fetch_ahead,
    };
    let mut summary = motley_ingest::ingest(&cfg).with_context(|| format!("ingest into {}", out.display()))?;
    if let Some(uri) = &remote {
        crate::remote::upload(&out, uri, &ctx.remote)
            .with_context(|| format!("uploading {} to {uri}", out.display()))?;
        summary.out = args.out.clone();
    }
    if ctx.json {
        return output::json(&summary);
    }
    print_summary(&summary)
}

fn print_summary(s: &Summary) -> anyhow::Result<()> {
    output::line(format!(
        "corpus {} (part {}): {} documents in {} shards, {} bytes",
        s.out.display(),
        s.part,
        s.documents,
        s.shards,
        s.output_bytes
    ))?;
    output::line(format!("tokens: text {}, image {}, speech {}", s.tokens.text, s.tokens.image, s.tokens.speech))?;
    output::line(format!(
        "tasks: {} ({} run now, {} resumed); records read {}; duplicates dropped {}",
        s.tasks, s.tasks_run, s.tasks_resumed, s.records, s.duplicates
    ))?;
    if s.errors > 0 {
        let reasons: Vec<String> = s.errors_by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
        output::line(format!(
            "skipped records: {} ({}), listed in {}/errors.jsonl",
            s.errors,
            reasons.join(", "),
            s.out.display()
        ))?;
    } else {
        output::line("skipped records: 0")?;
    }
    output::line(format!(
        "throughput: {:.1} s, {:.0} docs/s, {:.0} tokens/s, {:.1} MB/s input",
        s.elapsed_s, s.docs_per_s, s.tokens_per_s, s.input_mb_per_s
    ))
}
