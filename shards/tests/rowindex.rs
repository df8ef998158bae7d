//! The row index and the block shuffle: ranks that pack only their own rows (through the
//! index) deliver exactly the rows and states of the skip mode, read documents in proportion to
//! their own rows whatever the world size, reuse index files and rebuild damaged ones; the
//! block shuffle decodes each zstd chunk about once per epoch.

mod common;

use std::sync::Arc;

use motley_shards::{Batch, Compression, Corpus, Loader, LoaderConfig, LoaderState, RowIndexMode, Shuffle, Source};

fn corpus(n: u64, compression: Compression) -> anyhow::Result<(tempfile::TempDir, Arc<Corpus>)> {
    let dir = tempfile::tempdir()?;
    common::write_corpus(dir.path(), n, compression, 16 << 10)?;
    let c = Arc::new(Corpus::open(dir.path())?);
    Ok((dir, c))
}

fn cfg(index: &std::path::Path) -> LoaderConfig {
    LoaderConfig {
        seq_len: 32,
        batch_size: 3,
        seed: 5,
        prefetch: 0,
        shuffle_window: 17,
        index_dir: Some(index.to_path_buf()),
        ..Default::default()
    }
}

fn run(sources: &[Source], cfg: &LoaderConfig, steps: usize) -> anyhow::Result<(Vec<Batch>, LoaderState)> {
    let mut l = Loader::new(sources.to_vec(), cfg.clone())?;
    let b = (0..steps).map(|_| l.next_batch()).collect::<Result<Vec<_>, _>>()?;
    Ok((b, l.state()))
}

#[test]
fn own_rows_through_the_index_equal_the_skip_mode() -> anyhow::Result<()> {
    let ix = tempfile::tempdir()?;
    let (_a, raw) = corpus(70, Compression::Raw)?;
    let (_b, zstd) = corpus(45, Compression::Zstd)?;
    for (shuffle, split_segments, eval_fraction) in
        [(Shuffle::Block, false, 0.0), (Shuffle::Documents, true, 0.0), (Shuffle::Block, false, 0.2)]
    {
        let sources = vec![Source::new(raw.clone(), 2.0), Source::new(zstd.clone(), 1.0)];
        for world_size in [2usize, 3, 5] {
            for rank in [0, world_size - 1] {
                let c = LoaderConfig { shuffle, split_segments, eval_fraction, rank, world_size, ..cfg(ix.path()) };
                // Enough steps for several epochs of both sources.
                let steps = 120 / world_size;
                let skip = run(&sources, &LoaderConfig { row_index: RowIndexMode::Never, ..c.clone() }, steps)?;
                let own = run(&sources, &LoaderConfig { row_index: RowIndexMode::Always, ..c.clone() }, steps)?;
                assert!(skip.1.sources.iter().all(|s| s.epoch >= 2), "{:?}", skip.1);
                assert_eq!(own.1, skip.1, "{shuffle:?} world {world_size} rank {rank}: state");
                assert_eq!(own.0, skip.0, "{shuffle:?} world {world_size} rank {rank}: batches");
                // Elastic: the skip mode's state resumes through the index on another world size.
                let w = world_size + 1;
                let resume = |mode| -> anyhow::Result<Vec<Batch>> {
                    let c = LoaderConfig { rank: 1, world_size: w, row_index: mode, ..c.clone() };
                    let mut l = Loader::resume(sources.clone(), c, skip.1.clone())?;
                    (0..4).map(|_| Ok(l.next_batch()?)).collect()
                };
                assert_eq!(resume(RowIndexMode::Always)?, resume(RowIndexMode::Never)?);
            }
        }
    }
    Ok(())
}

#[test]
fn a_rank_reads_documents_for_its_own_rows_only() -> anyhow::Result<()> {
    let ix = tempfile::tempdir()?;
    let (d, _) = corpus(400, Compression::Raw)?;
    let reads = |world_size: usize, mode: RowIndexMode| -> anyhow::Result<u64> {
        let cfg = LoaderConfig { world_size, row_index: mode, ..cfg(ix.path()) };
        let mut counts = Vec::new();
        // The first pass builds the index files the four steps need; the second only reads them.
        for _ in 0..2 {
            let c = Arc::new(Corpus::open(d.path())?);
            let mut l = Loader::new(vec![Source::new(c.clone(), 1.0)], cfg.clone())?;
            l.next_batch()?;
            let before = c.docs_read();
            for _ in 0..3 {
                l.next_batch()?;
            }
            counts.push(c.docs_read() - before);
        }
        Ok(counts[1])
    };
    let one = reads(1, RowIndexMode::Never)?;
    let idx16 = reads(16, RowIndexMode::Always)?;
    let skip16 = reads(16, RowIndexMode::Never)?;
    // Documents per own row are about the same whatever the world size (the rows differ, so
    // the counts do too, a little); the skip mode reads every rank's rows.
    assert!(idx16 <= 2 * one + 6, "index at 16 ranks read {idx16}, one rank {one}");
    assert!(skip16 >= 8 * one, "skip mode at 16 ranks read {skip16}, one rank {one}");
    Ok(())
}

#[test]
fn index_files_are_reused_and_damaged_ones_rebuilt() -> anyhow::Result<()> {
    let ix = tempfile::tempdir()?;
    let (d, c) = corpus(120, Compression::Raw)?;
    let cfg = LoaderConfig { world_size: 4, rank: 2, row_index: RowIndexMode::Always, ..cfg(ix.path()) };
    let (want, _) = run(&[Source::new(c.clone(), 1.0)], &cfg, 3)?;
    let files: Vec<_> = std::fs::read_dir(ix.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "idx"))
        .collect();
    assert!(!files.is_empty());
    // Reused: a fresh corpus handle reads only this rank's documents for the first batch.
    let fresh = Arc::new(Corpus::open(d.path())?);
    let (got, _) = run(&[Source::new(fresh.clone(), 1.0)], &cfg, 3)?;
    assert_eq!(got, want);
    assert!(fresh.docs_read() < 40, "read {} documents: the index was rebuilt", fresh.docs_read());
    // Damaged (one entry byte flipped, then truncated): rebuilt, same rows.
    for damage in [0usize, 1] {
        for f in &files {
            let mut bytes = std::fs::read(f)?;
            if damage == 0 {
                let last = bytes.len() - 3;
                bytes[last] ^= 0x40;
            } else {
                bytes.truncate(bytes.len() - 16);
            }
            std::fs::write(f, &bytes)?;
        }
        let again = Arc::new(Corpus::open(d.path())?);
        let (got, _) = run(&[Source::new(again.clone(), 1.0)], &cfg, 3)?;
        assert_eq!(got, want, "damage {damage}");
        assert!(again.docs_read() >= 120, "damage {damage}: not rebuilt");
    }
    // A different seed is another key: its own files.
    let before = std::fs::read_dir(ix.path())?.count();
    run(&[Source::new(c, 1.0)], &LoaderConfig { seed: 6, ..cfg }, 1)?;
    assert!(std::fs::read_dir(ix.path())?.count() > before);
    Ok(())
}

#[test]
fn block_shuffle_decodes_each_zstd_chunk_about_once_per_epoch() -> anyhow::Result<()> {
    let ix = tempfile::tempdir()?;
    let (d, _) = corpus(300, Compression::Zstd)?;
    let decodes = |shuffle: Shuffle| -> anyhow::Result<(u64, u64)> {
        let c = Arc::new(Corpus::open(d.path())?);
        let chunks: u64 = c.manifest().shards.iter().map(|s| s.num_chunks).sum();
        let cfg = LoaderConfig { shuffle, shuffle_window: 40, ..cfg(ix.path()) };
        let mut l = Loader::new(vec![Source::new(c.clone(), 1.0)], cfg)?;
        while l.state().epoch == 0 {
            l.next_batch()?;
        }
        Ok((c.chunk_cache().counts().1, chunks))
    };
    let (block, chunks) = decodes(Shuffle::Block)?;
    let (docs, _) = decodes(Shuffle::Documents)?;
    assert!(block <= 2 * chunks + 4, "block shuffle decoded {block} chunks of {chunks}");
    // With the whole corpus in the cache the global shuffle decodes each chunk once too; the
    // cache bound is what matters there.
    let c = Arc::new(Corpus::open(d.path())?);
    c.chunk_cache().set_limit(0);
    let mut l =
        Loader::new(vec![Source::new(c.clone(), 1.0)], LoaderConfig { shuffle: Shuffle::Documents, ..cfg(ix.path()) })?;
    while l.state().epoch == 0 {
        l.next_batch()?;
    }
    let one_chunk = c.chunk_cache().counts().1;
    assert!(one_chunk > 2 * chunks, "global shuffle with one cached chunk decoded {one_chunk} of {chunks}");
    assert!(docs <= 2 * chunks + 4);
    Ok(())
}
