//! Loader basics: batch shapes, flattening with specials, determinism.

mod common;

use motley_shards::{Compression, Loader, LoaderConfig, Modality};

#[test]
fn batches_have_fixed_shape_and_specials() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    common::write_corpus(dir.path(), 50, Compression::Raw, 1 << 20)?;
    let cfg = LoaderConfig { seq_len: 64, batch_size: 3, seed: 1, prefetch: 2, ..Default::default() };
    let mut l = Loader::from_dir(dir.path(), cfg.clone())?;
    let v = l.vocab().clone();
    let bos = v.special("bos").unwrap_or(0);
    for _ in 0..5 {
        let b = l.next_batch()?;
        assert_eq!(b.inputs.len(), 3 * 64);
        assert_eq!(b.targets.len(), 3 * 64);
        assert_eq!(b.loss_mask.len(), 3 * 64);
        assert!(b.inputs.iter().all(|&t| t < v.total_size));
        assert!(b.inputs.contains(&bos));
        for (i, &t) in b.inputs.iter().enumerate() {
            if t < 1000 {
                assert_eq!(b.modality[i], Modality::Text as u8);
            }
        }
        assert_eq!(b.latents.positions.len() * 4, b.latents.data.len());
    }
    let st = l.state();
    assert_eq!(st.step, 5);
    let mut a = Loader::from_dir(dir.path(), LoaderConfig { prefetch: 0, ..cfg.clone() })?;
    let mut b = Loader::from_dir(dir.path(), cfg)?;
    for _ in 0..4 {
        assert_eq!(a.next_batch()?, b.next_batch()?);
    }
    Ok(())
}
